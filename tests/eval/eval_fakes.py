"""Test helpers for the evaluator tests (importable by spawned worker processes)."""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn


class KeyedTextModel(nn.Module):
    """A DualEncoder stand-in whose outputs are known in advance.

    ``encode_image`` normalises its input, so "images" are ``(B, D)`` vectors chosen by the test;
    ``encode_text`` maps each string to a fixed random unit vector seeded by its CRC32, so the
    same prompt always gets the same embedding in any process or batch.
    """

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self._texts: list[str] = []

    @property
    def embed_dim(self) -> int:
        return self.dim

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = []
        for t in texts:
            if t not in self._texts:
                self._texts.append(t)
            ids.append(self._texts.index(t))
        return torch.tensor(ids).unsqueeze(1)  # (B, 1)

    def text_vector(self, text: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return F.normalize(torch.randn(self.dim, generator=g), dim=0)  # (D,)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = [self.text_vector(self._texts[int(i)]) for i in tokens[:, 0]]
        return torch.stack(rows).to(self.anchor.device)  # (B, D)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.float().flatten(1), dim=-1)  # (B, D)
