r"""``clipkit eval knn``: weighted kNN classification of image features (InstDisc's rule).

Example (CPU, CIFAR-10: fit on train.tar, score test.tar)::

    clipkit eval knn --model runs/simclr --train ../shared/data/cifar10/train.tar \
        --data ../shared/data/cifar10/test.tar --k 200 --temperature 0.07 --output knn.json

Each TEST image's ``--k`` most cosine-similar TRAIN images vote for their class with weight
exp(cos / T) (Wu et al. 2018); features are L2-normalised ``encode_image`` outputs (an SSL
run: the backbone, before the projection head). ``--train`` and ``--data`` take every labelled
layout ``clipkit eval zeroshot`` reads and must describe the same classes.

The same ``EVALUATOR`` runs inside training (``driver.evaluate(EVALUATOR, model, TEST,
KnnOptions(train=TRAIN), accelerator=...)``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from clipkit.eval import driver
from clipkit.eval.train_test import (
    ClassSets,
    TrainTestOptions,
    add_train_test_options,
    check_class_sets,
)


@dataclass
class KnnOptions(TrainTestOptions):
    """Options of kNN classification (CLI flags of the same names)."""

    k: int = 200  # neighbours that vote
    temperature: float = 0.07  # T in the vote weight exp(cos / T)


def _add_options(parser: argparse.ArgumentParser) -> None:
    add_train_test_options(parser)
    parser.add_argument("--k", type=int, default=200, help="neighbours that vote (default 200)")
    parser.add_argument(
        "--temperature", type=float, default=0.07, help="T in the vote weight exp(cos / T)"
    )


def _prepare(data: str, options: KnnOptions) -> ClassSets:
    if options.k < 1:
        raise ValueError(f"--k must be >= 1 (got {options.k})")
    if not options.temperature > 0:
        raise ValueError(f"--temperature must be > 0 (got {options.temperature})")
    return check_class_sets(data, options)


def run_knn(ctx: driver.EvalContext) -> driver.Outcome:
    """kNN-classify ``ctx.data``'s features against ``--train``'s (ranks split the TEST rows)."""
    from clipkit.eval.gather import gather_rows
    from clipkit.eval.knn import knn_classify
    from clipkit.eval.train_test import outcome, rows_of_rank, train_test_features

    opts: KnnOptions = ctx.options
    tt = train_test_features(ctx)
    # Every rank holds all features; each ranks its own slice of TEST rows, then they gather.
    mine = rows_of_rank(len(tt.test), ctx.rank, ctx.world_size)
    topk = knn_classify(
        tt.train.feats.to(ctx.device), tt.train.labels.to(ctx.device),
        tt.test.feats[mine].to(ctx.device), k=opts.k, temperature=opts.temperature,
        num_classes=tt.num_classes,
    )  # fmt: skip
    if ctx.accelerator is not None:
        (topk,), _ = gather_rows(ctx.accelerator, topk)
    details = {"k": min(opts.k, len(tt.train)), "temperature": opts.temperature}
    return outcome(tt, topk.cpu().to(torch.long).numpy(), details)


EVALUATOR = driver.Evaluator(
    name="knn",
    task="knn_classification",
    options=KnnOptions,
    run=run_knn,
    add_options=_add_options,
    prepare=_prepare,
)
