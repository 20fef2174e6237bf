"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, arXiv 2303.15343), exact and tiled."""

from __future__ import annotations

import torch

from clipkit.losses.infonce import as_scale, check_pair, key_set
from clipkit.losses.tiled import TiledSigmoidSum, default_chunk


@torch.compiler.disable
def siglip_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    hard_negatives: torch.Tensor | None = None,
    chunk_size: int | None = None,
    extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid loss ``-(1/N) sum_ij log sigmoid(z_ij (s q_i . k_j + b))``, ``z = 2 I - 1``.

    Same value as open_clip's ``SigLipLoss`` on one process, computed tile by tile.

    Args:
        q: (N, D) L2-normalised queries.
        k: (N, D) L2-normalised keys; ``k[i]`` is ``q[i]``'s positive, all other pairs negative.
        logit_scale: 0-d tensor (or float), the multiplier (SigLIP initialises it to 10).
        logit_bias: 0-d tensor (or float), the bias (SigLIP initialises it to -10).
        hard_negatives: (N*h, D) extra negative keys (every query's negatives); get gradients.
        chunk_size: tile edge; None/0 = 512 on CPU, 2048 on GPU.
        extra_negatives: (Q, D) gradient-free extra negative keys (e.g. a queue).

    Returns:
        0-d loss in float32 (float64 for float64 inputs).

    Raises:
        ValueError: on mismatched shapes, non-scalar scale/bias or a negative chunk size.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
        >>> loss = siglip_loss(q, q, torch.tensor(10.0), torch.tensor(-10.0))
    """
    check_pair(q, k, {"hard_negatives": hard_negatives, "extra_negatives": extra_negatives})
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 or None = default), got {chunk_size}")
    s = as_scale(logit_scale, q)
    b = as_scale(logit_bias, q, "logit_bias")
    keys = key_set(k, hard_negatives, extra_negatives)  # (N + N*h + Q, D)
    chunk = chunk_size or default_chunk(q.device)
    return TiledSigmoidSum.apply(q, keys, s, b, 0, chunk) / q.shape[0]


@torch.compiler.disable
def siglip_sharded(
    q: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    keys_all: torch.Tensor,
    offset: int,
    n_global: int,
    world_size: int,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """One rank's share of the global-batch SigLIP loss, scaled for DDP's gradient averaging.

    Local rows ``q (n, D)`` against all keys ``keys_all (M, D)`` (positive of ``q[i]`` at
    ``keys_all[offset + i]``); returns ``world_size / n_global`` times their summed loss, so
    that DDP's mean over ranks of the gradients equals the global-batch gradient (see
    :func:`clipkit.losses.infonce.info_nce_sharded`).
    """
    s = as_scale(logit_scale, q)
    b = as_scale(logit_bias, q, "logit_bias")
    chunk = chunk_size or default_chunk(q.device)
    total = TiledSigmoidSum.apply(q, keys_all, s, b, offset, chunk)
    return total * (world_size / n_global)
