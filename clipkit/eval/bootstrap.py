"""Percentile-bootstrap confidence intervals for evaluation metrics.

The evaluation set is resampled with replacement (its queries: images for classification and
image->text, captions for text->image) and every metric is recomputed on each resample; the 2.5th
and 97.5th percentiles give the 95% interval (Efron & Tibshirani 1993, ch. 13).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm


def bootstrap_ci(
    stat: Callable[[np.ndarray], dict[str, float]],
    n: int,
    n_boot: int,
    *,
    seed: int = 0,
    level: float = 0.95,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Percentile-bootstrap intervals of every metric ``stat`` returns.

    Args:
        stat: maps ``(n,)`` sample indices (with repeats) to a dict of metrics.
        n: number of samples (queries) in the evaluation set.
        n_boot: number of resamples (e.g. 1000).
        seed: RNG seed, so intervals are reproducible.
        level: coverage of the interval.
        progress: show a progress bar.

    Returns:
        ``{metric: [low, high]}``.

    Raises:
        ValueError: ``n_boot < 1`` or ``n < 1``.
    """
    if n_boot < 1 or n < 1:
        raise ValueError(f"bootstrap needs n_boot >= 1 and samples >= 1 (got {n_boot}, {n})")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in tqdm(range(n_boot), desc="bootstrap", disable=not progress, leave=False):
        for k, v in stat(rng.integers(0, n, size=n)).items():
            draws.setdefault(k, []).append(v)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for k, v in draws.items()}
