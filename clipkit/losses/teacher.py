"""The momentum (EMA) teacher shared by MoCo now and BYOL / SwAV next.

MoCo's key encoder (He et al. 2020) and BYOL's target network (Grill et al. 2020) are the same
object: a copy of the student whose weights follow the student's as an exponential moving
average, ``teacher = m * teacher + (1 - m) * student``, with no gradients of its own. BYOL raises
``m`` from its base value to 1 on a cosine schedule over training; MoCo v2 keeps it fixed (base =
final). The teacher is a plain module beside the loss modules: it is not wrapped by DDP (every
rank applies the same update to the same weights, so ranks stay identical without
communication), it is saved in every checkpoint and resumed exactly, and it is exported next to
the student.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``.

    Args:
        step: optimiser steps done (0 = before the first update).
        total_steps: the run's length; at ``step >= total_steps`` the momentum is ``final``.
        base, final: the momentum at the start and the end (equal: a constant momentum).

    Raises:
        ValueError: momenta outside [0, 1] or ``total_steps < 1``.
    """
    if not (0.0 <= base <= 1.0 and 0.0 <= final <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got base={base}, final={final}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MomentumTeacher(nn.Module):
    """An EMA copy of ``student``: parameters averaged; buffers (BN running statistics) are the
    teacher's own, updated by its forward passes as in MoCo's key encoder and BYOL's target.

    Args:
        student: the module to follow; deep-copied at construction (so build it before
            ``accelerator.prepare`` wraps the student).
        base, final: momentum at the first and the last step (see :func:`cosine_momentum`).

    Example:
        >>> teacher = MomentumTeacher(model, base=0.99, final=1.0)
        >>> teacher.update(model, step=1, total_steps=1000)  # after each optimiser step
    """

    def __init__(self, student: nn.Module, base: float = 0.99, final: float = 1.0) -> None:
        super().__init__()
        cosine_momentum(0, 1, base, final)  # validate the momenta now, not at the first update
        self.base, self.final = float(base), float(final)
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.register_buffer("momentum", torch.tensor(float(base), dtype=torch.float64))

    def forward(self, *args, **kwargs):
        """The teacher's forward, without autograd."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, total_steps: int) -> float:
        """One EMA step towards ``student`` (unwrapped); returns the momentum used.

        ``step`` is the optimiser step just taken (1-based), so a resumed run recomputes the
        same momentum from the step it resumes at.
        """
        m = cosine_momentum(step - 1, total_steps, self.base, self.final)
        for t, s in zip(self.module.parameters(), student.parameters(), strict=True):
            t.mul_(m).add_(s.detach().to(t.dtype), alpha=1.0 - m)  # (t = m t + (1 - m) s)
        self.momentum.fill_(m)
        return m


__all__ = ["MomentumTeacher", "cosine_momentum"]
