"""One way to turn a model argument (``--model``, ``Embedder.load``) into a DualEncoder.

Accepted: an export folder (``open_clip_config.json`` + weights), a training run folder (its
``export/``), a checkpoint folder (``config.yaml`` + ``model.safetensors``), or
``open_clip:ARCH`` (an open_clip or clipkit architecture, with an optional local weights file);
also an image-SSL export (``ssl_config.json``: an :class:`~clipkit.models.ssl.SSLModel`, whose
``encode_image`` gives backbone features) or a run folder holding one.
A Hugging Face ``transformers`` ``CLIPModel`` folder (``clipkit export --format hf``, or any
CLIPModel with CLIP's vocabulary) loads as the open_clip model it maps to
(:func:`clipkit.models.export_hf.load_hf_clip`, bit-exact weights). An ONNX export has no
PyTorch model: ``Embedder.load`` reads it (onnxruntime); here it is refused in one line.
``clipkit eval``, ``clipkit export`` and ``clipkit embed`` / ``serve`` all read models through
:func:`load_model`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from clipkit.models.dual_encoder import (
    EXPORT_CONFIG,
    DualEncoder,
    build_dual_encoder,
    load_dual_encoder,
)


def _load_checkpoint(path: Path) -> DualEncoder:
    """A training checkpoint: rebuild the model from its config.yaml, then load its weights."""
    from safetensors.torch import load_file

    from clipkit.config.loader import load_config

    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"checkpoint {path} has config.yaml but no model.safetensors")
    cfg = load_config(path / "config.yaml")
    if cfg.task != "clip":
        raise ValueError(f"checkpoint {path} is a '{cfg.task}' model, not an image-text model")
    # The checkpoint's own weights replace everything: the run's model.pretrained (a file that
    # may have moved, or a path relative to where the run started) is not read again.
    cfg.model.pretrained = ""
    model = build_dual_encoder(cfg.model, cfg.loss, cfg.ssl)  # SLIP runs: with their SSL head
    state = load_file(str(weights))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise ValueError(f"checkpoint {weights} does not fit its config.yaml (key '{bad}')")
    return model


def load_model(
    spec: str, pretrained: str = "", seed: int | None = 0
) -> tuple[DualEncoder | Any, str]:
    """A DualEncoder and its canonical name from a model argument.

    Args:
        spec: export folder, run folder holding ``export/``, checkpoint folder, HF
            ``CLIPModel`` folder, or ``open_clip:ARCH``.
        pretrained: for ``open_clip:ARCH``, a local weights file; empty means random weights
            drawn with ``seed`` (useful for tests, meaningless as a score; a warning says so).
        seed: seed of the random initialisation, announced on stderr when there are no weights
            (None: leave torch's RNG as it is, silently, as ``Embedder.load`` does).

    Returns:
        ``(model on the CPU as built, name)``; the name is the folder actually loaded (a run's
        ``export/``) or ``spec`` for ``open_clip:ARCH``.

    Raises:
        ValueError: nothing loadable at ``spec``, or ``pretrained`` is not a local file.

    Example:
        >>> model, name = load_model("runs/digits")  # name ends in runs/digits/export
    """
    from clipkit.config.schema import ModelConfig

    if spec.startswith("open_clip:"):
        arch = spec.split(":", 1)[1]
        if pretrained and not Path(pretrained).expanduser().is_file():
            raise ValueError(
                f"weights file not found: {pretrained} (a local file is needed for {spec})"
            )
        if seed is not None:  # a reproducible random model (tests, baselines): say so
            if not pretrained:
                print(f"warning: {arch} with random weights (seed {seed})", file=sys.stderr)
            torch.manual_seed(seed)
        return build_dual_encoder(ModelConfig(name=arch, pretrained=pretrained)), spec
    if pretrained:
        raise ValueError(f"a weights file applies only to open_clip:ARCH, not to {spec}")
    p = Path(spec).expanduser()
    from clipkit.models.ssl import SSL_CONFIG, load_ssl_model

    for folder in (p, p / "export"):  # an image-SSL export (backbone features for kNN / probes)
        if (folder / SSL_CONFIG).is_file():
            return load_ssl_model(folder), str(folder)
    if (p / EXPORT_CONFIG).is_file():
        return load_dual_encoder(p), str(p)
    if (p / "export" / EXPORT_CONFIG).is_file():
        return load_dual_encoder(p / "export"), str(p / "export")
    from clipkit.models.export_hf import is_hf_clip, load_hf_clip

    if is_hf_clip(p):
        return load_hf_clip(p), str(p)
    if (p / "config.yaml").is_file():
        return _load_checkpoint(p), str(p)
    from clipkit.embed.onnx_model import is_onnx_export

    if is_onnx_export(p):
        raise ValueError(
            f"model '{spec}' is an ONNX export: Embedder.load, clipkit embed and clipkit serve "
            "read it; evaluation and export need the PyTorch model (open_clip or hf export)"
        )
    raise ValueError(
        f"model '{spec}': not an export folder ({EXPORT_CONFIG}), a run folder with export/, "
        "a checkpoint folder (config.yaml), a Hugging Face CLIPModel folder or open_clip:ARCH"
    )


__all__ = ["load_model"]
