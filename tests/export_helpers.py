"""Exports of one small random-weight CLIP, written once per test session (issue 16's tests).

``exported(tmp_path_factory, fmt)`` gives the folder of ``clipkit-tiny`` (a ViT-B-32-family
model: ViT image tower, CLIP text transformer, 64 px, 4 layers; seed 0) as an open_clip export
(``open_clip``) or as ``clipkit export`` wrote it from there (``hf``, ``onnx``). The ONNX export
takes ~20 s on 2 cores; tests/models and tests/embed share it through the session's temp root.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ARCH = "clipkit-tiny"


def exported(factory: pytest.TempPathFactory, fmt: str) -> Path:
    """The ``fmt`` export folder of the session's tiny model (made on first use)."""
    root = factory.getbasetemp() / "issue16_exports"
    base = root / "open_clip"
    if not (base / "open_clip_config.json").is_file():
        from clipkit.config.schema import ModelConfig
        from clipkit.models import build_dual_encoder

        torch.manual_seed(0)
        build_dual_encoder(ModelConfig(name=ARCH)).export(base)
    if fmt == "open_clip":
        return base
    out = root / fmt
    if not out.is_dir():
        from clipkit.models.export_cli import export

        export(str(base), fmt, out, command=f"clipkit export open_clip --format {fmt}")
    return out


def coco_images(data_root: Path, n: int, size: int) -> list:
    """``n`` COCO-mini images (RGB PIL) whose centre crop at ``size`` is placed alike by
    torchvision (offset rounded half to even) and transformers (rounded down): the resized long
    side exceeds ``size`` by a margin that is not 3 mod 4."""
    from PIL import Image

    out = []
    for f in sorted((data_root / "coco_mini" / "train2017").glob("*.jpg")):
        im = Image.open(f).convert("RGB")
        short, long = min(im.size), max(im.size)
        if (int(size * long / short) - size) % 4 != 3:
            out.append(im)
        if len(out) == n:
            break
    return out
