"""Linear probes on frozen features: the CLIP paper's protocol and CLIP_benchmark's.

* ``clip`` (Radford et al. 2021, App. A.3): scikit-learn's L-BFGS logistic regression
  (``max_iter=1000``) on the features; the L2 strength is searched over 10^-6 .. 10^6 in 96
  log steps (8 per decade) by a parametric binary search: start at every second decade, then
  halve the interval around the peak until a step is one grid point; scored on a held-out
  part of TRAIN; the chosen ``C`` is refit on all of TRAIN. A given ``C`` skips the search.
* ``cb`` (CLIP_benchmark's ``linear_probe``): a ``torch.nn.Linear`` trained with AdamW and a
  per-step cosine learning rate (no warm-up), cross-entropy, ``epochs`` passes over shuffled
  batches; weight decay searched over 10^-6 .. 10^2 (97 log steps) by the same binary search
  on the validation part, then the probe is retrained on TRAIN + validation. Runs on any device
  (CLIP_benchmark asserts CUDA).

Both take the same deterministic, class-stratified held-out split (:func:`holdout_split`) and
break ties in the search towards the first candidate tried (CLIP_benchmark's rule).
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

C_GRID = np.logspace(-6, 6, 97)  # CLIP A.3: 10^-6 .. 10^6, 96 steps (C = 1 / lambda)
WD_GRID = np.logspace(-6, 2, 97)  # CLIP_benchmark's weight decays
SEARCH_START = 16  # grid points between the first candidates: every second decade (CLIP A.3)


@dataclass
class ProbeResult:
    """A fitted probe's ranked TEST predictions and how its hyperparameter was chosen."""

    topk: np.ndarray  # (M, min(5, C)) class ids, best first
    value: float  # the chosen C (clip) or weight decay (cb)
    search: list[tuple[float, float]] = field(default_factory=list)  # (value, val acc1) tried
    converged: bool = True  # clip: the final L-BFGS fit stopped before max_iter


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, class-stratified split of TRAIN rows into fit and held-out parts.

    Each class keeps at least one row on the fit side and gives ``round(n_c * fraction)`` rows
    (at least one when it has two or more) to the held-out side.

    Args:
        labels: ``(N,)`` class ids.
        fraction: share of each class held out, in ``(0, 1)``.
        seed: the permutation's seed (same seed, same split, on any machine).

    Returns:
        ``(fit_idx, val_idx)``: sorted int64 row indices.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)`` or nothing to hold out.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1) (got {fraction})")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n = min(max(round(len(rows) * fraction), 1), len(rows) - 1)
        val.append(rows[:n])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    if len(val_idx) == 0:
        raise ValueError("TRAIN is too small to hold out a validation part (one row per class)")
    fit_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return fit_idx.astype(np.int64), val_idx.astype(np.int64)


def peak_search(
    score: Callable[[int], float], n: int, start: int = SEARCH_START
) -> tuple[int, list[int]]:
    """The CLIP paper's parametric binary search for the best index of an ``n``-point grid.

    Scores every ``start``-th index, then repeatedly scores the neighbours ``step`` away from
    the peak (``step`` = start/2, start/4, ..., 1) and moves there when one is better. Each index
    is scored once; ties keep the first candidate in order (left, peak, right).

    Args:
        score: index -> validation score (higher is better).
        n: grid size.
        start: spacing of the first candidates (a power of two).

    Returns:
        ``(best index, indices in the order scored)``.
    """
    seen: dict[int, float] = {}

    def best_of(idxs: list[int]) -> int:
        best = idxs[0]
        for i in idxs:
            if i not in seen:
                seen[i] = score(i)
            if seen[i] > seen[best]:
                best = i
        return best

    peak = best_of(list(range(0, n, start)))
    step = start // 2
    while step > 0:
        peak = best_of([max(peak - step, 0), peak, min(peak + step, n - 1)])
        step //= 2
    return peak, list(seen)


def _ranked(scores: np.ndarray, top: int) -> np.ndarray:
    # Stable sort of the negated scores: equal scores rank by class id (lower first).
    return np.argsort(-scores, axis=1, kind="stable")[:, :top]


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((_ranked(scores, 1)[:, 0] == labels).mean())


# --------------------------------------------------------------------------- clip: scikit-learn
def logistic_scores(
    x_fit: np.ndarray, y_fit: np.ndarray, x: np.ndarray, c: float, num_classes: int
) -> tuple[np.ndarray, bool]:
    """Fit ``LogisticRegression(C=c, max_iter=1000)`` and score ``x`` for all classes.

    Returns:
        ``(scores (M, num_classes), converged)``: decision values, ``-inf`` for classes absent
        from ``y_fit`` (the ranking's first column is exactly ``LogisticRegression.predict``),
        and whether L-BFGS stopped before ``max_iter``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        # Weakly regularised fits (large C) often use all 1,000 iterations: the protocol's cap,
        # reported as ``converged`` rather than as a warning per fit.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=c, max_iter=1000).fit(x_fit, y_fit)
    d = clf.decision_function(x)
    if d.ndim == 1:  # two classes: predict() is classes_[1] where d > 0, else classes_[0]
        d = np.stack([np.zeros_like(d), d], axis=1)
    scores = np.full((x.shape[0], num_classes), -np.inf)
    scores[:, clf.classes_] = d
    return scores, bool(np.max(clf.n_iter_) < clf.max_iter)


def clip_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    num_classes: int,
    c: float | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> ProbeResult:
    """The CLIP paper's linear probe (see the module docstring).

    Args:
        x_train: ``(N, D)`` L2-normalised TRAIN features (float32 or float64).
        y_train: ``(N,)`` class ids.
        x_test: ``(M, D)`` TEST features.
        num_classes: ``C``.
        c: inverse L2 strength; None searches :data:`C_GRID` on the held-out part.
        holdout: share of TRAIN held out for the search.
        seed: the held-out split's seed.
        progress: print (stderr) each searched ``C`` and its held-out accuracy.

    Returns:
        :class:`ProbeResult` (``value`` = the ``C`` used).

    Example:
        >>> r = clip_probe(train.feats.numpy(), train.labels.numpy(), test.feats.numpy(),
        ...                num_classes=10, c=0.316)
    """
    search: list[tuple[float, float]] = []
    if c is None:
        fit, val = holdout_split(y_train, holdout, seed)

        def score(i: int) -> float:
            s, _ = logistic_scores(x_train[fit], y_train[fit], x_train[val], C_GRID[i], num_classes)
            acc = _accuracy(s, y_train[val])
            search.append((float(C_GRID[i]), acc))
            if progress:
                print(f"linear probe: C={C_GRID[i]:.4g} held-out acc1={acc:.4f}", file=sys.stderr)
            return acc

        best, _ = peak_search(score, len(C_GRID))
        c = float(C_GRID[best])
    elif not c > 0:
        raise ValueError(f"C must be > 0 (got {c})")
    scores, converged = logistic_scores(x_train, y_train, x_test, c, num_classes)
    return ProbeResult(_ranked(scores, min(5, num_classes)), float(c), search, converged)


# --------------------------------------------------------------------------- cb: torch linear
def train_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float,
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.nn.Linear:
    """CLIP_benchmark's probe training: AdamW, per-step cosine LR from ``lr`` to 0, shuffled
    batches, cross-entropy.

    Args:
        x: ``(N, D)`` features, on the device to train on.
        y: ``(N,)`` class ids, same device.
        num_classes: output width.
        weight_decay: AdamW's decoupled weight decay.
        lr: peak learning rate.
        epochs: passes over ``x``.
        batch_size: rows per step (the last batch of an epoch may be smaller).
        seed: initialisation and shuffling seed; the caller's RNG state is left as it was.
        autocast: the forward's autocast context (fp32: none).

    Returns:
        The trained ``nn.Linear(D, num_classes)`` on ``x``'s device.
    """
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the Linear's default init draws from here, as in CLIP_benchmark
        probe = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
        perms = [torch.randperm(n) for _ in range(epochs)]  # CPU: same order on any device
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    step = 0
    for perm in perms:
        perm = perm.to(x.device)
        for s in range(0, n, batch_size):
            for group in opt.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * lr
            idx = perm[s : s + batch_size]
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(probe(x[idx]), y[idx])
            loss.backward()
            opt.step()
            step += 1
    return probe


@torch.no_grad()
def _logits(probe: torch.nn.Linear, x: torch.Tensor, autocast: Callable) -> np.ndarray:
    with autocast():
        return probe(x).float().cpu().numpy()


def cb_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    *,
    num_classes: int,
    weight_decay: float | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    lr: float = 0.1,
    epochs: int = 10,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
) -> ProbeResult:
    """CLIP_benchmark's linear probe (see the module docstring), on any device.

    Args:
        x_train: ``(N, D)`` L2-normalised TRAIN features.
        y_train: ``(N,)`` class ids.
        x_test: ``(M, D)`` TEST features.
        num_classes: ``C``.
        weight_decay: fixed weight decay; None searches :data:`WD_GRID` on the held-out part.
        holdout: share of TRAIN held out for the search.
        seed: the split's, initialisation's and shuffling's seed.
        lr: AdamW's peak learning rate (CLIP_benchmark's default 0.1).
        epochs: passes per fit (CLIP_benchmark's default 10).
        batch_size: rows per step (CLIP_benchmark's default 64).
        device: where to train.
        autocast: the forward's autocast context.
        progress: print (stderr) each searched weight decay and its held-out accuracy.

    Returns:
        :class:`ProbeResult` (``value`` = the weight decay used).
    """
    dev = torch.device(device)
    x_tr = x_train.to(dev, torch.float32)
    y_tr = y_train.to(dev, torch.long)
    kw = dict(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, autocast=autocast)
    search: list[tuple[float, float]] = []
    if weight_decay is None:
        fit, val = holdout_split(y_train.cpu().numpy(), holdout, seed)
        fit_t, val_t = torch.from_numpy(fit).to(dev), torch.from_numpy(val).to(dev)
        y_val = y_train.cpu().numpy()[val]

        def score(i: int) -> float:
            probe = train_linear(
                x_tr[fit_t], y_tr[fit_t], num_classes, weight_decay=float(WD_GRID[i]), **kw
            )
            acc = _accuracy(_logits(probe, x_tr[val_t], autocast), y_val)
            search.append((float(WD_GRID[i]), acc))
            if progress:
                print(f"linear probe: wd={WD_GRID[i]:.4g} held-out acc1={acc:.4f}", file=sys.stderr)
            return acc

        best, _ = peak_search(score, len(WD_GRID))
        weight_decay = float(WD_GRID[best])
    elif weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0 (got {weight_decay})")
    # As CLIP_benchmark: the final probe sees TRAIN and the held-out part together.
    probe = train_linear(x_tr, y_tr, num_classes, weight_decay=weight_decay, **kw)
    logits = _logits(probe, x_test.to(dev, torch.float32), autocast)
    return ProbeResult(_ranked(logits, min(5, num_classes)), float(weight_decay), search)


__all__ = [
    "C_GRID",
    "WD_GRID",
    "ProbeResult",
    "cb_probe",
    "clip_probe",
    "holdout_split",
    "logistic_scores",
    "peak_search",
    "train_linear",
]
