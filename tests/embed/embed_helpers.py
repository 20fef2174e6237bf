"""Helpers shared by the embedding tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` random RGB images of varied sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 7 * (i % 5), 50 + 11 * (i % 3)
        out.append(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    return out


def png_bytes(img: Image.Image) -> bytes:
    """``img`` encoded as PNG."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_catalog_dir(embedder, tmp_path, n: int = 12):
    """An image folder with captions, embedded and indexed; returns (folder, index dir)."""
    from clipkit.cli import main
    from clipkit.embed.dataset import embed_dataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(make_images(n, seed=11)):
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"random picture {i}")
    embed_dataset(embedder, str(folder), tmp_path / "emb", progress=False)
    ix = tmp_path / "ix"
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(ix)]) == 0
    return folder, ix
