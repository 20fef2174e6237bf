"""Smoke run of bench/ssl_train.py (clipkit's SSL trainer vs lightly 1.6's recipes, issues 13-14).

End to end on a tiny cut of CIFAR-10: BYOL, Barlow Twins and SwAV on both sides plus the
supervised baseline, 2 steps x batch 8 on 80 training images with kNN after each step (50 test
images against a 50-image bank): both tables, the plot and the summary line come out, with
finite numbers for every run. SimCLR and MoCo run through the same code paths (their runner
steps, the trainer's configs); they are left out here to keep this file near 90 s on 2 quiet
cores (each side of each method is a fresh process). The timings mean nothing at this size.
The speed rule (intervals after a kNN step left out) is checked on its own, without a run.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(
    r"ssl vs lightly: worst kNN gap ([+-]\d+\.\d\d) points, slowest speed ratio (\d+\.\d\d)x"
)
METHODS = ("byol", "barlow_twins", "swav")


def _missing_lightly() -> str | None:
    """What keeps lightly's transforms, heads and losses from importing (None: nothing)."""
    for mod in ("lightly.loss", "lightly.models.modules", "lightly.transforms"):
        try:
            importlib.import_module(mod)
        except ImportError as err:
            return (
                f"{mod}: {err} (.ci/run: pip install --no-deps lightly==1.6.0 lightning-utilities)"
            )
    return None


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module("ssl_train")
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_speed_leaves_out_intervals_after_knn_steps() -> None:
    bench = _bench()
    args = argparse.Namespace(steps=12, knn_every=4)
    assert bench.knn_steps(args) == [4, 8, 12]
    run = {"steps": [2, 4, 6, 8, 10, 12], "rates": [1.0, 10.0, 2.0, 12.0, 3.0, 11.0]}
    # First interval (start-up) and those starting at steps 4 and 8 (evaluation) are out.
    assert bench.speed(run, args) == 11.0
    assert bench.knn_steps(argparse.Namespace(steps=5, knn_every=0)) == [5]


@pytest.mark.slow
def test_ssl_bench_smoke(data_root: Path, tmp_path: Path) -> None:
    missing = _missing_lightly()
    if missing:
        pytest.skip(missing)
    plot = tmp_path / "knn_steps.png"
    cmd = [
        sys.executable, str(REPO / "bench" / "ssl_train.py"),
        "--methods", ",".join((*METHODS, "supervised")), "--steps", "2", "--batch", "8",
        "--log-every", "1", "--knn-every", "1", "--workers", "0", "--train-per-class", "8",
        "--knn-train-per-class", "5", "--knn-test-per-class", "5", "--plot", str(plot),
        "--no-lock",
    ]  # fmt: skip
    env = {**os.environ, "CLIPKIT_DATA": str(data_root), "MPLBACKEND": "Agg"}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    lines = res.stdout.strip().splitlines()
    m = SUMMARY.fullmatch(lines[-1])
    assert m, lines[-1]
    assert math.isfinite(float(m[1])) and float(m[2]) > 0
    assert plot.is_file() and plot.stat().st_size > 0

    table = [ln.strip("|").split("|") for ln in lines if ln.startswith("| ") and "---" not in ln]
    main = [[c.strip() for c in r] for r in table if len(r) == 8 and r[0].strip() != "method"]
    want = {(m, s) for m in METHODS for s in ("lightly", "clipkit")}
    assert {(r[0], r[1]) for r in main} == want | {("supervised", "supervised (no lightly side)")}
    for r in main:
        steps, batch, sps, knn, _, loss = (float(x) for x in r[2:8])
        assert (steps, batch) == (2, 8)
        assert math.isfinite(sps) and sps > 0, r
        assert 0.0 <= knn <= 100.0, r
        assert math.isfinite(loss), r

    # kNN over steps: one row per run, a value at steps 1 and 2 whose last is the final kNN.
    curve = [[c.strip() for c in r] for r in table if len(r) == 4 and r[0].strip() != "method"]
    assert len(curve) == len(main)
    final = {(r[0], r[1]): r[5] for r in main}
    for r in curve:
        assert all(0.0 <= float(x) <= 100.0 for x in r[2:]), r
        assert r[3] == final[r[0], r[1]], r
