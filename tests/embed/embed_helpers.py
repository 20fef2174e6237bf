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
