"""Autograd-aware all-gather for the distributed losses (kept apart from the loss math).

The backward of a gather must *sum* the gradients that every rank's loss sends to a shard
(an all-reduce), then hand each rank its own slice; a plain ``dist.all_gather`` has no
backward at all, which is how open_clip's local-loss-without-gather-with-grad goes wrong.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's leading size ``n`` (ranks may hold different batch sizes)."""
    _, w = world()
    mine = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(mine) for _ in range(w)]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank, _ = world()
        big = max(sizes)
        pad = x.new_zeros((big, *x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad.contiguous())
        ctx.rank, ctx.sizes = rank, sizes
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])  # (sum(sizes), ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        # Each rank's loss sent gradients to every shard: sum them, keep my slice.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(
    x: torch.Tensor, sizes: list[int] | None = None
) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from all ranks (rank order), differentiably.

    Args:
        x: (n, ...) this rank's tensor; ranks may differ in ``n`` but not in the other dims.
        sizes: every rank's ``n`` when already known (saves one small collective).

    Returns:
        ``(x_all (sum n, ...), offset)``, ``offset`` being where this rank's rows start.
        Without an initialised process group: ``(x, 0)``.
    """
    rank, w = world()
    if w == 1:
        return x, 0
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    return _AllGather.apply(x, sizes), sum(sizes[:rank])


class _AverageGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad / world()[1]


def average_grad(x: torch.Tensor) -> torch.Tensor:
    """Identity whose backward averages the gradient over ranks (what DDP does to parameters).

    For tensors outside any DDP-wrapped module (the loss's own temperature) so that every rank
    applies the same update. Averaging is idempotent: equal gradients stay unchanged.
    """
    return _AverageGrad.apply(x) if world()[1] > 1 else x
