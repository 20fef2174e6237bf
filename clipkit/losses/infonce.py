"""InfoNCE (CLIP's symmetric contrastive loss, SimCSE's in-batch loss), exact and tiled.

``info_nce`` is the single-process loss; ``info_nce_sharded`` is the per-rank part of the same
loss when the batch is split over processes (see :mod:`clipkit.losses.module` for how it is
driven). Both go through :class:`~clipkit.losses.tiled.TiledLogSumExp`, so the ``N x M`` logit
matrix never exists.
"""

from __future__ import annotations

import torch

from clipkit.losses.tiled import TiledLogSumExp, acc_dtype, default_chunk


def as_scale(
    value: torch.Tensor | float, ref: torch.Tensor, name: str = "logit_scale"
) -> torch.Tensor:
    """Return ``value`` as a 0-d tensor on ``ref``'s device (keeps autograd when it is a tensor).

    Raises:
        ValueError: when ``value`` is not a scalar.
    """
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), device=ref.device, dtype=torch.float32)
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
    return value.reshape(())


def check_pair(q: torch.Tensor, k: torch.Tensor, extra: dict[str, torch.Tensor | None]) -> None:
    """Validate ``q (N, D)``, ``k (N, D)`` and extra key sets ``(*, D)``.

    Raises:
        ValueError: naming the argument and its shape.
    """
    if q.dim() != 2 or k.dim() != 2:
        raise ValueError(f"q and k must be 2-D (N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] == 0:
        raise ValueError("q and k are empty (N = 0)")
    for name, t in extra.items():
        if t is not None and (t.dim() != 2 or t.shape[1] != q.shape[1]):
            raise ValueError(f"{name} must be (M, {q.shape[1]}), got {tuple(t.shape)}")


def _check_options(label_smoothing: float, chunk_size: int | None) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 or None = default), got {chunk_size}")


def key_set(
    k: torch.Tensor, hard_negatives: torch.Tensor | None, extra_negatives: torch.Tensor | None
) -> torch.Tensor:
    """Key columns: positives first, then hard negatives, then (gradient-free) extra negatives."""
    parts = [k]
    if hard_negatives is not None:
        parts.append(hard_negatives.to(k.dtype))
    if extra_negatives is not None and extra_negatives.shape[0] > 0:
        parts.append(extra_negatives.detach().to(k.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # (M, D)


def _ce_terms(
    lse: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    label_smoothing: float,
) -> torch.Tensor:
    """Per-row cross-entropy ``lse - (1-eps) pos - eps * mean_j L_ij``, shape (n,).

    ``mean_j L_ij = s * rows_i . mean(cols)``, so label smoothing needs no extra tile pass.
    """
    if label_smoothing == 0.0:
        return lse - pos
    acc = lse.dtype
    mean_logit = scale.to(acc) * (rows.to(acc) @ cols.to(acc).mean(0))  # (n,)
    return lse - (1.0 - label_smoothing) * pos - label_smoothing * mean_logit


@torch.compiler.disable
def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    hard_negatives: torch.Tensor | None = None,
    symmetric: bool = True,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    extra_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact InfoNCE over in-batch negatives, computed tile by tile (no ``N x N`` matrix).

    Row ``i`` is the cross-entropy of ``L_i = s * q_i @ keys.T`` with ``k_i`` the positive,
    where ``keys = [k; hard_negatives; extra_negatives]``. When ``symmetric``, the same is done
    from the keys' side over the positives only (column ``j < N`` against all ``N`` queries) and
    the two means are averaged: with no extras this is open_clip's ``ClipLoss``.

    Args:
        q: (N, D) L2-normalised queries (e.g. image embeddings).
        k: (N, D) L2-normalised keys; ``k[i]`` is ``q[i]``'s positive.
        logit_scale: 0-d tensor (or float), the multiplier ``exp(log-temperature)``; gets a
            gradient when it requires one.
        hard_negatives: (N*h, D) extra key columns (SimCSE supervised); they get gradients.
        symmetric: also average in the keys-to-queries cross-entropy.
        label_smoothing: as ``F.cross_entropy(label_smoothing=eps)`` on each direction's rows.
        chunk_size: tile edge; None/0 = 512 on CPU, 2048 on GPU.
        extra_negatives: (Q, D) gradient-free key columns, e.g. a MoCo queue.

    Returns:
        0-d loss in float32 (float64 for float64 inputs).

    Raises:
        ValueError: on mismatched shapes, a non-scalar scale or bad options.

    Example:
        >>> q = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
        >>> loss = info_nce(q, q, torch.tensor(1 / 0.07))
    """
    check_pair(q, k, {"hard_negatives": hard_negatives, "extra_negatives": extra_negatives})
    _check_options(label_smoothing, chunk_size)
    s = as_scale(logit_scale, q)
    n = q.shape[0]
    keys = key_set(k, hard_negatives, extra_negatives)  # (M, D)
    chunk = chunk_size or default_chunk(q.device)
    row_lse, col_lse, pos = TiledLogSumExp.apply(q, keys, s, 0, n if symmetric else 0, chunk)
    rows = _ce_terms(row_lse, pos, q, keys, s, label_smoothing)  # (N,)
    if not symmetric:
        return rows.mean()
    cols = _ce_terms(col_lse, pos, k, q, s, label_smoothing)  # (N,)
    return 0.5 * (rows.mean() + cols.mean())


@torch.compiler.disable
def info_nce_sharded(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    q_all: torch.Tensor,
    keys_all: torch.Tensor,
    offset: int,
    n_global: int,
    world_size: int,
    symmetric: bool = True,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """One rank's share of the global-batch InfoNCE, scaled for DDP's gradient averaging.

    Local rows ``q`` are scored against all keys ``keys_all`` (positive of ``q[i]`` at
    ``keys_all[offset + i]``), local positive columns ``k`` against all queries ``q_all``. The
    return value is ``world_size / n_global`` times this rank's summed row (and column) losses:
    summed over ranks it is ``world_size`` times the global loss, so after the all-gather's
    backward (a sum over ranks) and DDP's mean over ranks, every gradient equals the
    single-process global-batch gradient. With equal shards the value is the mean over the
    local rows, and the mean of the ranks' values is the global loss.

    Args:
        q: (n, D) this rank's queries; k: (n, D) this rank's positive keys.
        logit_scale: 0-d tensor, the multiplier.
        q_all: (N, D) all ranks' queries, gathered with gradient.
        keys_all: (M, D) all ranks' positive keys, then all hard negatives / extra negatives.
        offset: index of ``q[0]`` in the global batch.
        n_global: N, the global batch size.
        world_size: number of processes.
        symmetric, label_smoothing, chunk_size: as in :func:`info_nce`.

    Returns:
        0-d tensor (accumulation dtype).
    """
    _check_options(label_smoothing, chunk_size)
    s = as_scale(logit_scale, q)
    chunk = chunk_size or default_chunk(q.device)
    row_lse, _, pos = TiledLogSumExp.apply(q, keys_all, s, offset, 0, chunk)
    total = _ce_terms(row_lse, pos, q, keys_all, s, label_smoothing).sum()
    if symmetric:
        col_lse, _, pos_t = TiledLogSumExp.apply(k, q_all, s, offset, 0, chunk)
        total = 0.5 * (total + _ce_terms(col_lse, pos_t, k, q_all, s, label_smoothing).sum())
    return total * (world_size / n_global)


__all__ = ["acc_dtype", "info_nce", "info_nce_sharded"]
