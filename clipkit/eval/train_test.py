"""What the feature evaluators (``knn``, ``linear-probe``) share: a TRAIN and a TEST set.

Both read two labelled sets in any layout :func:`~clipkit.eval.datasets.open_labelled` takes,
check that they describe the same classes (before the model is loaded), extract their features
(:func:`~clipkit.eval.features.extract_features`: rank-split, gathered, optionally cached) and
report CLIP_benchmark's metrics over the TEST rows.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipkit.eval import driver
from clipkit.eval.features import Features, extract_features


@dataclass
class TrainTestOptions:
    """Options every feature evaluator has (CLI flags of the same names)."""

    train: str = ""  # the labelled set the classifier is fit on (--data is the one scored)
    train_split: str = "train"  # split folder of TRAIN when it is a CLIP_benchmark layout
    split: str = "test"  # split folder of --data when it is a CLIP_benchmark layout
    cache_dir: str = ""  # feature cache folder; empty: no cache


def add_train_test_options(parser: argparse.ArgumentParser) -> None:
    """``--train``, ``--train-split``, ``--split``, ``--cache-dir``."""
    parser.add_argument(
        "--train", required=True, help="labelled TRAIN set (same layouts as --data)"
    )
    parser.add_argument(
        "--train-split", default="train", help="split folder of a CLIP_benchmark TRAIN"
    )
    parser.add_argument("--split", default="test", help="split folder of a CLIP_benchmark --data")
    parser.add_argument(
        "--cache-dir",
        default="",
        help="cache features here (e.g. ~/.cache/clipkit/features), keyed by the model's "
        "weights, the data's fingerprint and the transform; default: no cache",
    )


def _describe(a: list[str], b: list[str]) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if not only_a and not only_b:
        return "the same names in another order (labels would not line up)"
    parts = [f"only in TRAIN: {', '.join(only_a[:5])}" if only_a else ""]
    parts.append(f"only in TEST: {', '.join(only_b[:5])}" if only_b else "")
    return "; ".join(p for p in parts if p)


@dataclass(frozen=True)
class ClassSets:
    """The outcome of :func:`check_class_sets` (an evaluator's ``prepare`` result)."""

    classes: list[str] | None  # None when neither set names its classes (``cls`` shards)


def check_class_sets(data: str, options: TrainTestOptions) -> ClassSets:
    """Open TRAIN and TEST (no images decoded) and check they name the same classes in order.

    Returns:
        :class:`ClassSets` with the class names (None when neither set names them).

    Raises:
        ValueError: ``--train`` missing, a set that does not open, or different class sets.
    """
    from clipkit.eval.datasets import open_labelled

    if not options.train:
        raise ValueError("--train is needed: the labelled set to fit the classifier on")
    train = open_labelled(options.train, None, split=options.train_split)
    test = open_labelled(data, None, split=options.split)
    if train.classes is not None and test.classes is not None and train.classes != test.classes:
        raise ValueError(
            f"TRAIN {options.train} and TEST {data} have different class sets "
            f"({len(train.classes)} vs {len(test.classes)} classes; "
            f"{_describe(train.classes, test.classes)})"
        )
    return ClassSets(train.classes if train.classes is not None else test.classes)


@dataclass
class TrainTest:
    """Both sets' features, on every rank."""

    train: Features
    test: Features
    num_classes: int


def train_test_features(ctx: driver.EvalContext) -> TrainTest:
    """Extract (or read cached) TRAIN and TEST features for ``ctx``'s model.

    Raises:
        ValueError: unreadable sets, different class sets, or TEST labels TRAIN never has.
    """
    opts: TrainTestOptions = ctx.options
    checked = ctx.prepared
    if not isinstance(checked, ClassSets):
        checked = check_class_sets(ctx.data, opts)
    classes = checked.classes
    common: dict[str, Any] = dict(
        batch_size=ctx.batch_size, workers=ctx.workers, device=ctx.device,
        precision=ctx.precision, accelerator=ctx.accelerator, progress=ctx.progress,
        cache_dir=opts.cache_dir,
    )  # fmt: skip
    train = extract_features(ctx.model, opts.train, split=opts.train_split, desc="train", **common)
    test = extract_features(ctx.model, ctx.data, split=opts.split, desc="test", **common)
    # The driver's skip report takes its examples from ctx.log: give it both sets'.
    ctx.log = driver.SkipLog(())
    ctx.log.keys = train.skipped_keys + test.skipped_keys
    ctx.log.shard_keys = train.skipped_shard_keys + test.skipped_shard_keys
    if classes is None:  # cls shards name no classes: their labels must at least agree
        missing = sorted(set(test.labels.tolist()) - set(train.labels.tolist()))
        if missing:
            raise ValueError(
                f"TRAIN {opts.train} and TEST {ctx.data} have different class sets (TEST "
                f"labels {missing[:5]} never occur in TRAIN)"
            )
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    else:
        num_classes = len(classes)
    return TrainTest(train, test, num_classes)


def outcome(
    tt: TrainTest, topk: np.ndarray, details: dict[str, Any] | None = None
) -> driver.Outcome:
    """The driver's :class:`~clipkit.eval.driver.Outcome` for ranked TEST predictions.

    Args:
        tt: the features (for labels, counts and skips).
        topk: ``(M, min(5, C))`` predicted class ids of the TEST rows, best first.
        details: more JSON fields (the evaluator's settings and choices).
    """
    from clipkit.eval.zeroshot import classification_metrics

    labels = tt.test.labels.numpy().astype(np.int64)
    c = tt.num_classes
    return driver.Outcome(
        metrics=classification_metrics(topk, labels, c),
        counts={
            "n_samples": len(labels),
            "n_train": len(tt.train),
            "n_classes": c,
            "feature_dim": int(tt.train.feats.shape[1]),
        },  # fmt: skip
        skipped=tt.train.skipped + tt.test.skipped,
        skipped_shards=tt.train.skipped_shards + tt.test.skipped_shards,
        details=details or {},
        resamples=[
            driver.Resample(len(labels), lambda i: classification_metrics(topk[i], labels[i], c))
        ],
    )


def rows_of_rank(n: int, rank: int, world: int) -> slice:
    """The contiguous slice of ``n`` rows that ``rank`` of ``world`` works on."""
    return slice(rank * n // world, (rank + 1) * n // world)


__all__ = [
    "TrainTest",
    "TrainTestOptions",
    "add_train_test_options",
    "ClassSets",
    "check_class_sets",
    "outcome",
    "rows_of_rank",
    "train_test_features",
]
