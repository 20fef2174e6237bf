"""Elastic exact resume through the trainer: a run checkpointed on W processes x K workers goes
on on W' x K' and its epoch reads every remaining sample once (recorded keys), with one warning
line when the global batch changes. The loader-level checks of every shape change (and of the
crops) are in tests/data/test_loader.py; these run the real launch paths (torchrun + gloo)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from clipkit.train.cli import main

REPO = Path(__file__).resolve().parents[2]
TRAIN_KEYS = 1437  # the built-in digits' training split (4 shards: 400, 400, 400, 237)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _args(run: Path, cache: Path, workers: int, batch: int, steps: int) -> list[str]:
    return [
        f"data.cache_dir={cache}",
        f"train.output_dir={run}",
        f"data.workers={workers}",
        f"train.batch_size={batch}",
        f"train.max_steps={steps}",
        "train.record_keys=true",
        "train.log_every=1",
        "train.trackers=[]",
        "train.torch_threads=1",
        "train.keep_last=5",
        "optim.warmup_steps=2",
    ]


def _epoch_keys(run: Path, epoch: int) -> list[str]:
    """Keys of every step logged in ``epoch`` (metrics.jsonl's train/epoch), all ranks."""
    steps = set()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("train/epoch") == epoch:
            steps.add(rec["step"])
    keys = []
    for f in sorted(run.glob("keys.rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] in steps:
                keys += rec["keys"]
    return keys


def _check_epoch_once(run: Path, ranks: int, readers: int, batch: int) -> None:
    keys = _epoch_keys(run, 0)
    assert len(keys) == len(set(keys)), "a sample was read twice in the epoch"
    # Every sample of the epoch once, except what drop_last leaves: less than one batch per
    # reader of the new layout, and the trim that gives ranks equal steps (< 1 batch per rank
    # beyond the first). No reader of the first layout had filled its quota (dropping its tail).
    assert TRAIN_KEYS - len(keys) < (readers + ranks - 1) * batch
    assert _epoch_keys(run, 1), "the run went on into the next epoch"


@pytest.mark.slow
def test_two_by_two_resumes_on_one_by_two(tmp_path, cache, torchrun, caplog):
    run = tmp_path / "run"
    torchrun(REPO / "scripts" / "train.py", *_args(run, cache, 2, 64, 3), timeout=300)
    assert (run / "keys.rank1.jsonl").is_file()
    caplog.set_level(logging.WARNING)
    # 1437 - 3 x 128 samples left: 2 readers x 526 -> 16 steps of 64 on one process, then
    # epoch 1 begins.
    assert main(_args(run, cache, 2, 64, 20) + ["train.resume=latest"]) == 0
    warned = [r.getMessage() for r in caplog.records if "global batch" in r.getMessage()]
    assert len(warned) == 1 and "global batch 128 -> 64" in warned[0], warned
    _check_epoch_once(run, ranks=1, readers=2, batch=64)


@pytest.mark.slow
def test_one_by_one_resumes_on_two_by_one(tmp_path, cache, torchrun):
    run = tmp_path / "run"
    assert main(_args(run, cache, 1, 64, 5)) == 0
    # 1437 - 5 x 64 left: 2 ranks x 558 -> 8 steps of 2 x 64, then epoch 1 begins.
    res = torchrun(
        REPO / "scripts" / "train.py",
        *_args(run, cache, 1, 64, 15),
        "train.resume=latest",
        timeout=300,
    )
    assert res.stderr.count("global batch 64 -> 128") == 1, res.stderr[-2000:]
    _check_epoch_once(run, ranks=2, readers=2, batch=64)
