"""SwAV's swapped prediction (Caron et al. 2020, arXiv 2006.09882) with Sinkhorn-Knopp codes.

Every crop's features are scored against ``K`` prototypes. Each *high-resolution* crop ``i``
gets soft codes ``q_i`` from its scores by Sinkhorn-Knopp (equal-partition constraint, entropy
``epsilon``, a few iterations, no gradient); every other crop ``v`` (the other high-resolution
crops and all low-resolution ones) predicts them: ``-sum_k q_i log softmax(z_v / T)``. The
value is lightly 1.6's ``SwaVLoss(temperature, sinkhorn_iterations, sinkhorn_epsilon)``: the
mean over rows of each pair's cross-entropy, summed over the ``V - 1`` predicting crops and
divided by ``V - 1``, then averaged over the high-resolution crops; codes are computed only for
high-resolution crops. With a queue, the queued features' scores join the Sinkhorn rows of their
crop (then are dropped), as in lightly and the paper's code.

Sinkhorn under torch.distributed (``all_ranks=True``): the per-prototype sums run over every
rank's rows (an all-reduce), each row's own normalisation is local, so the codes of ``W``
processes are exactly the codes of one process holding the global batch, whatever the shard
sizes. The iterations run on log-codes (log-sum-exp normalisations): the paper's code and
lightly exponentiate ``score / epsilon`` first, which overflows float32 from a score of ~4.4 and
leaves 0/0 where a prototype's whole column underflows; the uniform factors of their code (the
total mass, ``1/K``, ``1/B``) cancel and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipkit.losses.dist import world
from clipkit.losses.tiled import acc_dtype

Crops = torch.Tensor | Sequence[torch.Tensor]


def check_swav_options(temperature: float, epsilon: float, iterations: int) -> None:
    """Raises ValueError (one line) for a non-positive temperature / epsilon or iterations < 1."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"swav temperature must be > 0, got {temperature}")
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"swav sinkhorn epsilon must be > 0, got {epsilon}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"swav sinkhorn iterations must be an int >= 1, got {iterations!r}")


def _as_crops(x: Crops | None, name: str) -> list[torch.Tensor]:
    """``(V, N, K)`` tensor or a sequence of ``(N, K)`` -> list of ``(N, K)``."""
    if x is None:
        return []
    crops = list(x.unbind(0)) if isinstance(x, torch.Tensor) and x.dim() == 3 else list(x)
    for c in crops:
        if not isinstance(c, torch.Tensor) or c.dim() != 2:
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"swav {name} must be (V, N, K) or a list of (N, K), got {shape}")
    return crops


def check_crops(high: list[torch.Tensor], low: list[torch.Tensor], queue: list[torch.Tensor]):
    """All crops ``(N, K)`` with one ``N`` and ``K``; >= 1 high-res crop, >= 2 crops; queue
    ``(Q, K)`` per high-res crop.

    Raises:
        ValueError: one line naming the offending input and its shape.
    """
    if not high:
        raise ValueError("swav needs at least one high-resolution crop")
    if len(high) + len(low) < 2:
        raise ValueError("swav needs at least 2 crops (each crop predicts another's codes)")
    n, k = high[0].shape
    if n == 0 or k == 0:
        raise ValueError(f"swav scores are empty: {(n, k)}")
    for name, crops in (("high-resolution", high), ("low-resolution", low)):
        for v, c in enumerate(crops):
            if c.shape != (n, k):
                raise ValueError(
                    f"swav {name} crop {v} has scores {tuple(c.shape)}, expected {(n, k)}"
                )
    if queue and len(queue) != len(high):
        raise ValueError(f"swav queue needs one score set per high-resolution crop ({len(high)})")
    for v, c in enumerate(queue):
        if c.shape[1] != k:
            raise ValueError(f"swav queue {v} has scores {tuple(c.shape)}, expected (Q, {k})")


@torch.no_grad()
def sinkhorn_codes(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    all_ranks: bool = False,
) -> torch.Tensor:
    """Sinkhorn-Knopp soft codes: each prototype gets equal mass, each row sums to 1.

    Starting from ``exp(scores / epsilon)``, ``iterations`` times: divide every prototype's
    column by its sum over all rows, then every row by its sum. Equal to lightly 1.6's
    ``sinkhorn(scores, iterations, epsilon)``, computed on log-codes (see the module docstring).

    Args:
        scores: (B, K) similarities of features and prototypes (no gradient is taken).
        epsilon: entropy regularisation (SwAV: 0.05).
        iterations: Sinkhorn iterations (SwAV: 3).
        all_ranks: under torch.distributed, the column sums run over every rank's rows: the
            codes equal one process's codes of all ranks' rows, in any shard sizes.

    Returns:
        (B, K) codes in the accumulation dtype, rows summing to 1, no autograd history.
    """
    reduce = all_ranks and world()[1] > 1
    log_codes = scores.detach().to(acc_dtype(scores)) / epsilon  # (B, K)
    for _ in range(iterations):
        log_codes -= _log_mass(log_codes, reduce)  # (K,) each prototype's mass over all rows
        log_codes -= log_codes.logsumexp(1, keepdim=True)  # (B, 1) each row a distribution
    return log_codes.exp()


def _log_mass(log_codes: torch.Tensor, reduce: bool) -> torch.Tensor:
    """``log sum_rows exp(log_codes)`` per column ``(K,)``, over every rank's rows if ``reduce``."""
    top = log_codes.max(0).values  # (K,)
    if reduce:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    mass = (log_codes - top).exp().sum(0)  # (K,) >= 1 once summed over ranks
    if reduce:
        dist.all_reduce(mass)
    return top + mass.log()


def swav_rows(
    high: Crops,
    low: Crops | None = None,
    *,
    queue: Crops | None = None,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    all_ranks: bool = False,
) -> torch.Tensor:
    """Per-row SwAV losses ``(N,)``; their mean is :func:`swav_loss`.

    Row ``r``'s value is ``sum_i sum_{v != i} CE(q_i[r], z_v[r]) / (V_hi (V - 1))``, the sum
    over the high-resolution crops ``i`` and the crops ``v`` predicting their codes, so a
    distributed caller sums its rows and rescales (see :class:`~clipkit.losses.module.SwaVLoss`).
    Arguments as :func:`swav_loss`; ``all_ranks`` as :func:`sinkhorn_codes`.
    """
    check_swav_options(temperature, epsilon, iterations)
    hi, lo, qu = _as_crops(high, "high"), _as_crops(low, "low"), _as_crops(queue, "queue")
    check_crops(hi, lo, qu)
    n = hi[0].shape[0]
    dt = acc_dtype(*hi, *lo)
    codes = []
    for i, h in enumerate(hi):
        rows = torch.cat([h, qu[i].to(h.dtype)]) if qu else h  # (N + Q, K)
        codes.append(sinkhorn_codes(rows, epsilon, iterations, all_ranks=all_ranks)[:n].to(dt))
    out = hi[0].new_zeros(n, dtype=dt)  # (N,)
    for v, z in enumerate(hi + lo):
        # The codes this crop predicts: every high-resolution crop's but its own.
        targets = [c for i, c in enumerate(codes) if i != v]
        if not targets:  # the only high-resolution crop predicts nothing of its own
            continue
        logp = F.log_softmax(z.to(dt) / temperature, dim=-1)  # (N, K)
        out = out - (sum(targets) * logp).sum(-1)  # (N,)
    return out / (len(hi) * (len(hi) + len(lo) - 1))


def swav_loss(
    high: Crops,
    low: Crops | None = None,
    *,
    queue: Crops | None = None,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> torch.Tensor:
    """SwAV's multi-crop swapped-prediction loss (lightly 1.6's ``SwaVLoss``), one process.

    Args:
        high: prototype scores of the high-resolution crops: (V_hi, N, K) or V_hi x (N, K);
            each gets Sinkhorn codes and is predicted by every other crop.
        low: prototype scores of the low-resolution crops, (V_lo, N, K) or a list; they only
            predict. None: no small crops.
        queue: optional scores of queued high-resolution features, one (Q, K) per high crop:
            extra Sinkhorn rows for small batches (their codes are dropped).
        temperature: softmax temperature of the predictions (SwAV: 0.1).
        epsilon: Sinkhorn entropy regularisation (SwAV: 0.05).
        iterations: Sinkhorn iterations (SwAV: 3).

    Returns:
        0-d loss, float32 (float64 for float64 inputs). The codes carry no gradient.

    Raises:
        ValueError: mismatched shapes, fewer than 2 crops, bad options.

    Example:
        >>> high, low = torch.randn(2, 8, 30), torch.randn(6, 8, 30)
        >>> loss = swav_loss(high, low, temperature=0.1, epsilon=0.05, iterations=3)
    """
    return swav_rows(
        high, low, queue=queue, temperature=temperature, epsilon=epsilon, iterations=iterations
    ).mean()


__all__ = ["check_swav_options", "sinkhorn_codes", "swav_loss", "swav_rows"]
