"""Gathering per-sample evaluation outputs from every rank.

Evaluation data is usually split by rank without padding (``labelled_loader(rank=...,
world_size=...)``), so ranks may hold different numbers of samples and batches. A collective
inside the batch loop would then deadlock or fail on unequal shapes; instead each rank keeps its
rows and :func:`gather_rows` gathers them once at the end, padded to a common length and trimmed
back. Loaders prepared by Accelerate (which pad the last batch with duplicates) are gathered per
batch with ``gather_for_metrics``, which drops those duplicates.
"""

from __future__ import annotations

from typing import Any

import torch


def is_prepared_loader(batches: Any) -> bool:
    """True when ``batches`` is a DataLoader returned by ``accelerator.prepare``."""
    try:
        from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return False
    return isinstance(batches, (DataLoaderShard, DataLoaderDispatcher))


def gather_rows(accelerator: Any, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Concatenate every rank's rows, in rank order, for tensors of per-rank length.

    Args:
        accelerator: an ``accelerate.Accelerator`` (or None: returned unchanged).
        *tensors: tensors with the same first dimension ``n_r`` on this rank (``n_r`` may
            differ between ranks; other dimensions must agree).

    Returns:
        ``(gathered, counts)``: each tensor as ``(sum n_r, ...)`` on this rank's device, and the
        per-rank row counts ``[n_0, n_1, ...]``.
    """
    n = tensors[0].shape[0]
    if accelerator is None or accelerator.num_processes == 1:
        return list(tensors), [n]
    dev = accelerator.device
    counts = accelerator.gather(torch.tensor([n], device=dev)).tolist()  # (W,)
    out = []
    for t in tensors:
        padded = accelerator.pad_across_processes(t.to(dev).contiguous(), dim=0)
        full = accelerator.gather(padded)  # (W * max_n, ...)
        size = padded.shape[0]
        out.append(torch.cat([full[r * size : r * size + c] for r, c in enumerate(counts)]))
    return out, counts
