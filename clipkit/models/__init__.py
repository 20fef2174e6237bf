"""Dual encoders built from open_clip architectures and HF transformers text towers."""

from clipkit.models.dual_encoder import (
    DualEncoder,
    build_dual_encoder,
    load_dual_encoder,
    resolve_model_cfg,
)

__all__ = ["DualEncoder", "build_dual_encoder", "load_dual_encoder", "resolve_model_cfg"]
