"""Smoke run of bench/ssl_train.py (clipkit's SimCLR / MoCo trainer vs lightly 1.6's recipe).

One method per test, both sides, end to end on a tiny cut of CIFAR-10 (2 steps x batch 16 on
320 training images, kNN on 100 test images against 100 training images): the table and the
summary line come out, with finite numbers for both runs. The timings mean nothing at this size.
About 40 s per method on 2 quiet cores.
"""

from __future__ import annotations

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


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_ssl_bench_smoke(data_root: Path, method: str) -> None:
    missing = _missing_lightly()
    if missing:
        pytest.skip(missing)
    cmd = [
        sys.executable, str(REPO / "bench" / "ssl_train.py"), "--methods", method,
        "--steps", "2", "--batch", "16", "--train-per-class", "32",
        "--knn-train-per-class", "10", "--knn-test-per-class", "10", "--no-lock",
    ]  # fmt: skip
    env = {**os.environ, "CLIPKIT_DATA": str(data_root)}
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    lines = res.stdout.strip().splitlines()
    m = SUMMARY.fullmatch(lines[-1])
    assert m, lines[-1]
    assert math.isfinite(float(m[1])) and float(m[2]) > 0
    rows = [ln.strip("|").split("|") for ln in lines if ln.startswith(f"| {method} |")]
    got = {(r[0].strip(), r[1].strip()) for r in rows}
    assert got == {(method, "lightly"), (method, "clipkit")}, lines
    for r in rows:
        steps, batch, sps, knn, _, loss = (float(x) for x in r[2:8])
        assert (steps, batch) == (2, 16)
        assert math.isfinite(sps) and sps > 0, r
        assert 0.0 <= knn <= 100.0, r
        assert math.isfinite(loss), r
