"""Smoke run of bench/wise_ft.py (issue 16): both trainings, the subset shards and test cuts, the
sweep through ``clipkit wise-ft``, the copied table / JSON / plot and the summary line, at a size
where the numbers mean nothing (3 + 2 steps of 16, 10 test images per class)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wise_ft_bench_smoke(data_root: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(REPO / "bench" / "wise_ft.py"), "--zs-steps", "3", "--ft-steps", "2",
        "--batch", "16", "--ft-per-class", "20", "--test-per-class", "10", "--alphas", "0,0.5,1",
        "--workers", "0", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path / "res"),
    ]  # fmt: skip
    # the cache gets the full CIFAR-10 train shards the first time (as bench/train.py builds)
    home_cache = Path.home() / ".cache" / "clipkit" / "bench"
    if (home_cache / "cifar10_train" / "sizes.json").is_file():
        cmd[cmd.index("--cache") + 1] = str(home_cache)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"WiSE-FT alpha [\d.]+: fine-tuned classes 0\.\d{4} \(vs 0\.\d{4} at 1, 0\.\d{4} at 0\), "
        r"other classes 0\.\d{4} \(vs 0\.\d{4}, 0\.\d{4}\)",
        last,
    ), last
    out = json.loads((tmp_path / "res" / "wise_ft.json").read_text())
    assert [p["n"] for p in out["points"]] == [{"ft5": 50, "other5": 50, "all10": 100}] * 3
    assert (tmp_path / "res" / "wise_ft.png").read_bytes()[:4] == b"\x89PNG"
    assert "| alpha | ft5 acc1 | other5 acc1 | all10 acc1 |" in res.stdout
