"""MoCo's losses (He et al. 2020, arXiv 1911.05722; Chen et al. 2021, arXiv 2104.02057).

* v1/v2 (:func:`moco_loss`): each query's positive is its momentum key, its negatives are the
  rows of a queue of past keys only (not the other keys of the batch). This is the value of
  lightly's ``NTXentLoss(temperature, memory_bank_size=...)`` with that memory-bank content.
  The queue's log-sum-exp is tiled (:class:`~clipkit.losses.tiled.TiledLogSumExp`, recomputed in
  backward), so a 65,536-key queue never makes an ``N x Q`` matrix.
* v3 (:func:`moco_v3_loss`): no queue; each view's queries against the other view's keys of the
  whole (gathered) batch, both directions summed and scaled by ``2 T`` as in the paper's code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.losses.infonce import check_pair, info_nce
from clipkit.losses.ntxent import check_chunk, inverse_temperature, unit
from clipkit.losses.tiled import TiledLogSumExp, default_chunk


def check_queue_size(queue_size: int, keys_per_step: int) -> None:
    """A queue the ring buffer can use: a multiple of the keys pushed per step, and not smaller.

    Each step pushes ``keys_per_step`` keys (every rank's, gathered). MoCo's own code asserts
    ``K % batch_size == 0``; lightly's memory bank silently drops the keys that do not fit
    before it wraps. Requiring a multiple keeps whole batches in the queue, as both intend.

    Raises:
        ValueError: one line naming both sizes.
    """
    if keys_per_step < 1 or queue_size < keys_per_step or queue_size % keys_per_step:
        raise ValueError(
            f"loss.queue_size={queue_size} must be a positive multiple of the keys pushed per "
            f"step ({keys_per_step} = rows per process x processes x accumulation steps)"
        )


def moco_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    scale: torch.Tensor,
    chunk_size: int | None = 0,
) -> torch.Tensor:
    """Per-query MoCo losses ``(N,)``: ``-log(e^{pos} / (e^{pos} + sum_j e^{neg_j}))``.

    ``q`` and ``k`` are normalised here; ``queue`` is used as given (detached).
    """
    qn, kn = unit(q), unit(k)  # (N, D) each
    acc = qn.dtype
    s = scale.to(acc)
    chunk = chunk_size or default_chunk(q.device)
    # offset None: the queue holds no positives; only the row log-sum-exp over Q columns is used.
    lse_neg, _, _ = TiledLogSumExp.apply(qn, queue.detach().to(acc), s, None, 0, chunk)  # (N,)
    pos = s * (qn * kn).sum(-1)  # (N,) same dtype and rounding as the tiles' inputs
    # logsumexp([pos, negs]) - pos = softplus(lse_neg - pos) = -logsigmoid(pos - lse_neg);
    # F.softplus's threshold would drop exp(-x) for x > 20 (SigLIP's 2.4e-12, siglip.py).
    return -F.logsigmoid(pos - lse_neg)


@torch.compiler.disable
def moco_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: torch.Tensor | float = 0.2,
    *,
    chunk_size: int | None = 0,
) -> torch.Tensor:
    """MoCo v1/v2 InfoNCE: query ``i`` against its key ``i`` (positive) and the queue (negatives).

    Args:
        q: (N, D) queries from the student (normalised here).
        k: (N, D) keys from the momentum encoder (normalised here); ``k[i]`` is ``q[i]``'s
            positive. It gets a gradient if it requires one (MoCo's keys do not).
        queue: (Q, D) past keys, used as given (MoCo stores normalised keys), no gradient.
        temperature: > 0 (MoCo v2: 0.2); a 0-d tensor gets a gradient.
        chunk_size: tile edge over the queue; None/0 = the device default.

    Returns:
        0-d mean over the N queries, float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched shapes, an empty queue, a non-positive temperature.

    Example:
        >>> q, k = torch.randn(8, 4), torch.randn(8, 4)
        >>> queue = torch.nn.functional.normalize(torch.randn(64, 4), dim=-1)
        >>> loss = moco_loss(q, k, queue, 0.2)
    """
    check_pair(q, k, {"queue": queue})
    check_chunk(chunk_size)
    if queue.shape[0] == 0:
        raise ValueError("queue is empty: MoCo's negatives are the queue's rows")
    return moco_rows(q, k, queue, inverse_temperature(temperature, q), chunk_size).mean()


@torch.compiler.disable
def moco_v3_loss(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = 0,
) -> torch.Tensor:
    """MoCo v3: ``2 T (ctr(q1, k2) + ctr(q2, k1))``, in-batch keys as negatives, no queue.

    ``ctr(q, k)`` is the one-directional InfoNCE of the normalised rows (:func:`info_nce` with
    ``symmetric=False``); the ``2 T`` factor is the paper's code's. Under torch.distributed the
    keys of all ranks are the negatives: gather the keys (rank-offset positives) and call
    :func:`~clipkit.losses.infonce.info_nce_sharded` per direction.

    Args:
        q1, q2: (N, D) the student's queries of views 1 and 2 (after the predictor).
        k1, k2: (N, D) the momentum encoder's keys of views 1 and 2.
        temperature: > 0 (the paper's code: 1.0 for ResNets, 0.2 for ViTs).
        chunk_size: tile edge; None/0 = the device default.

    Returns:
        0-d loss, float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched shapes or a non-positive temperature.
    """
    check_pair(q1, k2, {"q2": q2, "k1": k1})
    check_pair(q2, k1, {})
    s = inverse_temperature(temperature, q1)
    ctr = [
        info_nce(unit(q), unit(k), s, symmetric=False, chunk_size=chunk_size)
        for q, k in ((q1, k2), (q2, k1))
    ]
    return (ctr[0] + ctr[1]) * (2.0 / s)


__all__ = ["check_queue_size", "moco_loss", "moco_rows", "moco_v3_loss"]
