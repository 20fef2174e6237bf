"""The evaluation driver: a new evaluator is a pure function plus a registration; the driver adds
timing, bootstrap, skip reporting, the JSON payload and the training scalars."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import numpy as np
import pytest

from clipkit.eval import driver


def mean_score(values: np.ndarray) -> dict[str, float]:
    """The 'pure evaluator' of this test: the mean of per-sample values."""
    return {"mean": float(values.mean())}


@dataclass
class MeanOptions:
    scale: float = 1.0


def _run(ctx: driver.EvalContext) -> driver.Outcome:
    batches = ctx.watch(
        [
            {"x": np.array([1.0, 2.0]), "skipped": 1, "skipped_keys": ["a.tar:k1"]},
            {"x": np.array([3.0, 6.0]), "skipped_shard_keys": ["b.tar: truncated"]},
        ]
    )
    values = np.concatenate([b["x"] for b in batches]) * ctx.options.scale  # (N,)
    return driver.Outcome(
        metrics=mean_score(values),
        counts={"n_samples": len(values)},
        skipped=1,
        skipped_shards=len(ctx.log.shard_keys),
        resamples=[driver.Resample(len(values), lambda i: mean_score(values[i]))],
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=float, default=1.0)


MEAN = driver.Evaluator("mean", "toy_mean", MeanOptions, _run, _add_options)


def test_new_evaluator_through_the_driver(tmp_path, capsys) -> None:
    rep = driver.evaluate(MEAN, None, "sets/toy/test.tar", MeanOptions(scale=2.0), device="cpu")
    assert rep.dataset == "toy" and rep.metrics == {"mean": 6.0}
    assert rep.scalars() == {"mean": 6.0, "n": 4.0, "skipped": 1.0, "skipped_shards": 1.0}
    assert any("skipped 1 unreadable" in w and "a.tar:k1" in w for w in rep.warnings)
    assert any("1 shard(s) truncated" in w for w in rep.warnings)

    parser = argparse.ArgumentParser()
    driver.add_arguments(parser, MEAN)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        ["--model", "m", "--data", "sets/toy/test.tar", "--output", str(out), "--scale", "2",
         "--bootstrap", "30", "--no-progress"]
    )  # fmt: skip
    assert MEAN.options_from(args) == MeanOptions(scale=2.0)
    rep = driver.evaluate(MEAN, None, args.data, MEAN.options_from(args), device="cpu",
                          bootstrap=args.bootstrap, seed=3)  # fmt: skip
    driver.write_json(str(out), rep.payload("m"))
    r = json.loads(out.read_text())
    assert r["task"] == "toy_mean" and r["metrics"] == {"mean": 6.0} and r["n_samples"] == 4
    assert r["skipped"] == 1 and r["skipped_examples"] == ["a.tar:k1"] and r["skipped_shards"] == 1
    lo, hi = r["metrics_ci95"]["mean"]
    assert 2.0 <= lo <= 6.0 <= hi <= 12.0 and r["bootstrap"] == 30
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind


def test_bootstrap_needs_resamples_and_precision_is_checked() -> None:
    no_ci = driver.Evaluator(
        "plain", "toy", MeanOptions, lambda ctx: driver.Outcome({"m": 1.0}, {}), _add_options
    )
    with pytest.raises(ValueError, match="does not apply to plain"):
        driver.evaluate(no_ci, None, "x", device="cpu", bootstrap=10)
    with pytest.raises(ValueError, match="precision"):
        driver.evaluate(no_ci, None, "x", device="cpu", precision="fp8")


def test_nested_metrics_flatten_for_training_logs() -> None:
    outcome = driver.Outcome({"spearman": {"a": 80.0, "b": 70.0}, "mean": 75.0}, {"n_pairs": 9})
    rep = driver.Report(MEAN, "sts", outcome, "fp32", 0.1)
    assert rep.scalars() == {
        "spearman/a": 80.0, "spearman/b": 70.0, "mean": 75.0, "n": 9.0, "skipped": 0.0,
        "skipped_shards": 0.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "data, name",
    [
        ("../shared/data/cifar10/test.tar", "cifar10"),
        ("coco_mini/captions.tsv", "coco_mini"),
        ("wds_cifar10/", "wds_cifar10"),
        ("shards/{00000..00009}.tar", "shards"),
    ],
)
def test_dataset_names(data: str, name: str) -> None:
    assert driver.dataset_name(data) == name
    assert driver.dataset_name(data, "mine") == "mine"
