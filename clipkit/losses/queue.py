"""Queues of past embeddings: MoCo's FIFO of keys used as extra negatives (He et al. 2020,
arXiv 1911.05722) and SwAV's per-rank queue of projections for small batches."""

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
        self._write(self.keys, keys)
        self.ptr.fill_((int(self.ptr) + keys.shape[0]) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + keys.shape[0]))

    @torch.no_grad()
    def pushed(self, keys: torch.Tensor) -> torch.Tensor:
        """The filled rows as they would be after ``push(keys)``, in a copy (nothing pushed)."""
        keys = keys.detach()[-self.size :]
        out = self.keys.clone()  # (size, D)
        self._write(out, keys)
        return out[: min(self.size, int(self.filled) + keys.shape[0])]

    def _write(self, buf: torch.Tensor, keys: torch.Tensor) -> None:
        """Write ``keys`` into the ring ``buf`` from ``ptr``, wrapping at the end."""
        b, p = keys.shape[0], int(self.ptr)
        first = min(b, self.size - p)
        buf[p : p + first] = keys[:first].to(buf.dtype)
        buf[: b - first] = keys[first:].to(buf.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The buffer's width is only known after the first push: adopt the checkpoint's shape.
        stored = state_dict.get(prefix + "keys")
        if stored is not None and stored.shape != self.keys.shape:
            self.keys = stored.new_zeros(stored.shape).to(self.keys.device)
        super()._load_from_state_dict(state_dict, prefix, *args)


class SwAVQueue(nn.Module):
    """SwAV's per-rank queue of past unit projections of the two large crops (Caron et al.
    2020, App. for small batches): buffers, so checkpoints carry it and a resume is exact.

    Scored with the current prototypes at every step (:meth:`scores`), the queue only adds
    Sinkhorn rows: the batch's codes see more samples, no gradient flows into it. Rows are
    pushed after each step (:meth:`step`) once ``start`` steps are done and used once full.
    """

    def __init__(self, size: int, start: int = 0) -> None:
        super().__init__()
        self.crops = nn.ModuleList([NegativeQueue(size), NegativeQueue(size)])
        self.start = int(start)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # This step's projections: GradCache embeds each micro-batch twice (without autograd,
        # then replayed); the first pass's rows are kept, the direct path's otherwise.
        self._pending: dict[bool, list[tuple[torch.Tensor, torch.Tensor]]] = {
            False: [],
            True: [],
        }

    def remember(self, u1: torch.Tensor, u2: torch.Tensor) -> None:
        """Keep the micro-batch's projections ``(B, P)`` for the push after the step."""
        self._pending[torch.is_grad_enabled()].append((u1.detach(), u2.detach()))

    def scores(self, prototypes: torch.Tensor) -> torch.Tensor | None:
        """``(2, Q, K)`` scores of the full queue under ``prototypes (K, P)``; None until full."""
        rows = [c.get() for c in self.crops]
        if any(r is None or r.shape[0] < c.size for r, c in zip(rows, self.crops)):
            return None
        w = prototypes.detach()  # (K, P)
        return torch.stack([r.to(w.dtype) @ w.T for r in rows])  # type: ignore[union-attr]

    @torch.no_grad()
    def step(self) -> int:
        """After an optimiser step: push its projections (once ``start`` steps are done);
        returns the rows filled."""
        pending = self._pending[False] or self._pending[True]
        if int(self.steps) >= self.start:
            for i, crop in enumerate(self.crops):
                crop.push(torch.cat([p[i] for p in pending]))
        self.steps += 1
        self._pending = {False: [], True: []}
        return int(self.crops[0].filled)
