"""SimCLR's NT-Xent (Chen et al. 2020, arXiv 2002.05709), exact and tiled.

Two views ``z1, z2`` of ``N`` images make ``2N`` embeddings; each one's positive is the other
view of its image, the other ``2N - 2`` are its negatives, and its own similarity is left out.
The loss is the mean of the ``2N`` cross-entropies (lightly's ``NTXentLoss``). The ``2N x 2N``
matrix never exists: :class:`~clipkit.losses.tiled.TiledPairLogSumExp` walks the tiles on and
above its diagonal (the matrix is symmetric) and recomputes them in backward.
``nt_xent_sharded`` is one rank's part of the same loss when the batch is split over processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.losses.infonce import as_scale, check_pair
from clipkit.losses.tiled import TiledLogSumExp, TiledPairLogSumExp, acc_dtype, default_chunk


def inverse_temperature(temperature: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    """``1 / temperature`` as a 0-d tensor on ``ref``'s device (keeps autograd for tensors).

    Raises:
        ValueError: a non-scalar or non-positive temperature.
    """
    if not isinstance(temperature, torch.Tensor):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        # float64: a float32 1/0.07 is 1e-9 off, visible against a float64 reference.
        return torch.tensor(1.0 / temperature, device=ref.device, dtype=torch.float64)
    t = as_scale(temperature, ref, "temperature")
    if not bool(t.detach() > 0):
        raise ValueError(f"temperature must be > 0, got {float(t.detach())}")
    return 1.0 / t


def check_chunk(chunk_size: int | None) -> None:
    """Raises ValueError for a negative tile edge (0 or None = the device default)."""
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 or None = default), got {chunk_size}")


def unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in the accumulation dtype (bf16/fp16 inputs are widened first)."""
    return F.normalize(x.to(acc_dtype(x)), dim=-1)


def nt_xent_scaled(
    z1: torch.Tensor, z2: torch.Tensor, scale: torch.Tensor, chunk_size: int | None = 0
) -> torch.Tensor:
    """:func:`nt_xent` with the multiplier ``scale = 1 / temperature`` given as a 0-d tensor."""
    check_pair(z1, z2, {})
    check_chunk(chunk_size)
    n = z1.shape[0]
    z = torch.cat([unit(z1), unit(z2)])  # (2N, D): view 1 of every image, then view 2
    row_lse, pos = TiledPairLogSumExp.apply(z, scale, n, chunk_size or default_chunk(z.device))
    return (row_lse - pos.repeat(2)).mean()  # pos[i] = L[i, i + N] = L[i + N, i]


@torch.compiler.disable
def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: torch.Tensor | float = 0.5,
    *,
    chunk_size: int | None = 0,
) -> torch.Tensor:
    """SimCLR's NT-Xent over ``2N`` views, exact, without the ``2N x 2N`` matrix.

    With ``z = [z1; z2]`` L2-normalised and ``L = z @ z.T / temperature``, row ``i``'s loss is
    ``logsumexp_{j != i} L[i, j] - L[i, p(i)]`` where ``p(i)`` is the other view of ``i``'s
    image; the result is the mean over the ``2N`` rows (lightly 1.6's
    ``NTXentLoss(temperature)(z1, z2)``).

    Args:
        z1: (N, D) embeddings of the first views (normalised here).
        z2: (N, D) embeddings of the second views; ``z2[i]`` is ``z1[i]``'s positive.
        temperature: > 0; a float, or a 0-d tensor that then gets a gradient.
        chunk_size: tile edge; None/0 = 512 on CPU, 2048 on GPU.

    Returns:
        0-d loss in float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched or empty inputs, a non-positive temperature, a negative chunk.

    Example:
        >>> z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
        >>> loss = nt_xent(z1, z2, 0.5)
    """
    check_pair(z1, z2, {})
    return nt_xent_scaled(z1, z2, inverse_temperature(temperature, z1), chunk_size)


@torch.compiler.disable
def nt_xent_sharded(
    z1: torch.Tensor,
    z2: torch.Tensor,
    scale: torch.Tensor,
    *,
    z_all: torch.Tensor,
    offset: int,
    n_global: int,
    world_size: int,
    chunk_size: int | None = 0,
) -> torch.Tensor:
    """One rank's share of the global-batch NT-Xent, scaled for DDP's gradient averaging.

    The local ``2n`` rows are scored against the ``2N`` gathered columns. ``z_all`` holds
    every rank's ``[z1; z2]`` block in rank order, so this rank's ``z1[i]`` is column
    ``offset + i`` (itself, left out) and its positive ``z2[i]`` is column ``offset + n + i``.
    The return value is ``world_size / (2 N)`` times the local rows' summed losses: summed over
    ranks it is ``world_size`` times the global loss, so after the gather's backward (a sum over
    ranks) and DDP's mean, every gradient equals the one-process global-batch gradient; with
    equal shards the mean of the ranks' values is the global loss.

    Args:
        z1: (n, D) this rank's first views, already L2-normalised.
        z2: (n, D) this rank's second views, already L2-normalised.
        scale: 0-d multiplier ``1 / temperature``.
        z_all: (2N, D) all ranks' ``[z1; z2]`` blocks, gathered with gradient.
        offset: column of ``z1[0]`` in ``z_all`` (twice the number of images on lower ranks).
        n_global: N, the number of images over all ranks.
        world_size: number of processes.
        chunk_size: tile edge; None/0 = the device default.

    Returns:
        0-d tensor (accumulation dtype).
    """
    check_chunk(chunk_size)
    n = z1.shape[0]
    chunk = chunk_size or default_chunk(z1.device)
    # Row i of z1: positive at column offset + n + i, itself at offset + i; z2 the other way.
    lse1, _, pos1 = TiledLogSumExp.apply(z1, z_all, scale, offset + n, 0, chunk, offset)
    lse2, _, pos2 = TiledLogSumExp.apply(z2, z_all, scale, offset, 0, chunk, offset + n)
    total = (lse1 - pos1).sum() + (lse2 - pos2).sum()
    return total * (world_size / (2 * n_global))


__all__ = ["nt_xent", "nt_xent_scaled", "nt_xent_sharded"]
