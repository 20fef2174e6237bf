r"""``clipkit eval linear-probe``: a linear classifier on frozen image features.

Examples (CIFAR-10: fit on train.tar, score test.tar; features cached for the next run)::

    clipkit eval linear-probe --model runs/mine/export --train ../shared/data/cifar10/train.tar \
        --data ../shared/data/cifar10/test.tar --protocol clip --output lp.json \
        --cache-dir ~/.cache/clipkit/features
    clipkit eval linear-probe --model M --train TRAIN --data TEST --protocol clip --C 3.16
    clipkit eval linear-probe --model M --train TRAIN --data TEST --protocol cb

``--protocol clip``: the CLIP paper's (scikit-learn L-BFGS logistic regression, max_iter 1000;
C searched over 10^-6..10^6 on a held-out part of TRAIN, then refit on all of TRAIN; ``--C``
fixes it). ``--protocol cb``: CLIP_benchmark's (a linear layer, AdamW, cosine schedule, weight
decay searched on the held-out part; ``--weight-decay`` fixes it), on CPU or GPU. Features are
L2-normalised ``encode_image`` outputs (an SSL run: the backbone, before the projection head).

The same ``EVALUATOR`` runs inside training (``driver.evaluate(EVALUATOR, model, TEST,
ProbeOptions(train=TRAIN, c=1.0), accelerator=...)``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from clipkit.eval import driver
from clipkit.eval.train_test import (
    ClassSets,
    TrainTestOptions,
    add_train_test_options,
    check_class_sets,
)

PROTOCOLS = ("clip", "cb")


@dataclass
class ProbeOptions(TrainTestOptions):
    """Options of the linear probe (CLI flags of the same names; ``c`` is ``--C``)."""

    protocol: str = "clip"  # clip (scikit-learn L-BFGS) or cb (CLIP_benchmark's torch probe)
    c: float | None = None  # clip: fixed C (no search)
    weight_decay: float | None = None  # cb: fixed weight decay (no search)
    holdout: float = 0.2  # share of TRAIN held out for the search (seeded, stratified)
    lr: float = 0.1  # cb: AdamW's peak learning rate
    epochs: int = 10  # cb: passes per fit
    probe_batch_size: int = 64  # cb: feature rows per step
    seed: int = 0  # held-out split, cb initialisation and shuffling (the driver's --seed)


def _add_options(parser: argparse.ArgumentParser) -> None:
    add_train_test_options(parser)
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="clip",
        help="clip: the CLIP paper's (scikit-learn); cb: CLIP_benchmark's",
    )
    parser.add_argument(
        "--C", dest="c", type=float, help="clip: fixed inverse L2 strength (skips the search)"
    )
    parser.add_argument(
        "--weight-decay", type=float, help="cb: fixed weight decay (skips the search)"
    )
    parser.add_argument(
        "--holdout", type=float, default=0.2, help="share of TRAIN held out for the search"
    )
    parser.add_argument("--lr", type=float, default=0.1, help="cb: peak learning rate")
    parser.add_argument("--epochs", type=int, default=10, help="cb: epochs per fit")
    parser.add_argument("--probe-batch-size", type=int, default=64, help="cb: rows per step")


def _prepare(data: str, options: ProbeOptions) -> ClassSets:
    o = options
    if o.protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)} (got '{o.protocol}')")
    if o.c is not None and o.protocol != "clip":
        raise ValueError("--C applies to --protocol clip (cb searches or fixes --weight-decay)")
    if o.weight_decay is not None and o.protocol != "cb":
        raise ValueError("--weight-decay applies to --protocol cb (clip searches or fixes --C)")
    if o.c is not None and not o.c > 0:
        raise ValueError(f"--C must be > 0 (got {o.c})")
    if o.weight_decay is not None and o.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0 (got {o.weight_decay})")
    if not 0 < o.holdout < 1:
        raise ValueError(f"--holdout must be in (0, 1) (got {o.holdout})")
    if o.lr <= 0 or o.epochs < 1 or o.probe_batch_size < 1:
        raise ValueError(
            f"--lr must be > 0, --epochs and --probe-batch-size >= 1 (got {o.lr}, {o.epochs}, "
            f"{o.probe_batch_size})"
        )
    return check_class_sets(data, options)


def _fit(ctx: driver.EvalContext, tt: Any) -> tuple[Any, dict[str, Any]]:
    from clipkit.eval.linear_probe import cb_probe, clip_probe

    o: ProbeOptions = ctx.options
    common = dict(num_classes=tt.num_classes, holdout=o.holdout, seed=o.seed)
    if o.protocol == "clip":
        r = clip_probe(
            tt.train.feats.numpy(), tt.train.labels.numpy(), tt.test.feats.numpy(), c=o.c,
            progress=ctx.progress, **common,
        )  # fmt: skip
        details = {
            "protocol": "clip", "C": r.value, "converged": r.converged,
            "search": [[v, a] for v, a in r.search],
        }  # fmt: skip
    else:
        r = cb_probe(
            tt.train.feats, tt.train.labels, tt.test.feats, weight_decay=o.weight_decay,
            lr=o.lr, epochs=o.epochs, batch_size=o.probe_batch_size, device=ctx.device,
            autocast=ctx.autocast, progress=ctx.progress, **common,
        )  # fmt: skip
        details = {
            "protocol": "cb", "weight_decay": r.value, "lr": o.lr, "epochs": o.epochs,
            "probe_batch_size": o.probe_batch_size, "search": [[v, a] for v, a in r.search],
        }  # fmt: skip
    details.update(holdout=o.holdout, seed=o.seed, searched=bool(r.search))
    return r, details


def run_linear_probe(ctx: driver.EvalContext) -> driver.Outcome:
    """Fit the probe on ``--train``'s features and score ``ctx.data``'s."""
    from clipkit.eval.train_test import outcome, train_test_features

    tt = train_test_features(ctx)
    # The fit is sequential: one rank fits and the others receive its result, so every rank
    # reports the same numbers even where floating point would differ between processes.
    payload: list[Any] = [None]
    if ctx.rank == 0:
        payload = [_fit(ctx, tt)]
    if ctx.world_size > 1:
        from accelerate.utils import broadcast_object_list

        payload = broadcast_object_list(payload, from_process=0)
    result, details = payload[0]
    return outcome(tt, result.topk, details)


EVALUATOR = driver.Evaluator(
    name="linear_probe",
    task="linear_probe",
    options=ProbeOptions,
    run=run_linear_probe,
    add_options=_add_options,
    prepare=_prepare,
)
