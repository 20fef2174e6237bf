"""MoCo-style FIFO of past keys used as extra negatives (He et al. 2020, arXiv 1911.05722)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NegativeQueue(nn.Module):
    """Ring buffer of the last ``size`` keys (detached), stored as buffers so it checkpoints.

    The embedding width is taken from the first ``push``; ``get`` returns only filled rows.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be > 0, got {size}")
        self.size = int(size)
        self.register_buffer("keys", torch.zeros(0, 0))  # (size, D) once the width is known
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def get(self) -> torch.Tensor | None:
        """The stored keys ``(filled, D)`` in ring order (irrelevant to the loss); None if empty."""
        n = int(self.filled)
        return None if n == 0 else self.keys[:n]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Append ``keys (B, D)`` (only the newest ``size`` rows if more), dropping the oldest."""
        keys = keys.detach()[-self.size :]
        if self.keys.numel() == 0:
            self.keys = keys.new_zeros(self.size, keys.shape[1])
        elif keys.shape[1] != self.keys.shape[1]:
            raise ValueError(f"queue holds dim {self.keys.shape[1]}, got keys {tuple(keys.shape)}")
        b, p = keys.shape[0], int(self.ptr)
        first = min(b, self.size - p)
        self.keys[p : p + first] = keys[:first].to(self.keys.dtype)
        self.keys[: b - first] = keys[first:].to(self.keys.dtype)
        self.ptr.fill_((p + b) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + b))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The buffer's width is only known after the first push: adopt the checkpoint's shape.
        stored = state_dict.get(prefix + "keys")
        if stored is not None and stored.shape != self.keys.shape:
            self.keys = stored.new_zeros(stored.shape).to(self.keys.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
