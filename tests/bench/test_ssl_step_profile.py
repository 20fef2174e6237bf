"""Smoke run of bench/ssl_step_profile.py (where an SSL step's time goes, clipkit vs lightly).

One process, both sides, SimCLR at batch 8 for 1 timed step on 8 CIFAR-10 images: every phase
row, the page-fault row and the summary line come out with finite, positive numbers. The
timings mean nothing at this size; nothing is asserted about them.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("keep", [False, True])
def test_one_process_profile_prints_every_row(keep, data_root, capsys):
    pytest.importorskip("lightly.transforms")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        bench = importlib.import_module("ssl_step_profile")
    finally:
        sys.path.remove(str(REPO / "bench"))
    argv = ["--methods", "simclr", "--batch", "8", "--steps", "1", "--images", "4"]
    argv += ["--train", str(data_root / "cifar10" / "train.tar")]
    assert bench.main(argv + (["--keep-freed-memory"] if keep else [])) == 0
    out = capsys.readouterr().out
    assert f"keep freed memory: {keep}" in out
    for phase in ("forward+loss", "backward", "optimiser+after", "step"):
        ms = re.search(rf"  {re.escape(phase)} +clipkit +([\d.]+) ms +lightly +([\d.]+) ms", out)
        assert ms and float(ms[1]) > 0 and float(ms[2]) > 0, (phase, out)
    assert re.search(r"page faults/step +clipkit +\d+ +lightly +\d+", out), out
    assert re.search(r"simclr: step clipkit / lightly \d+\.\d{3}x; views CPU [\d.]+ vs", out), out
