"""Two gloo processes, each with part of the batch, give one process's global-batch gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_loss_worker.py")


@pytest.mark.slow
def test_two_processes_equal_one_global_batch(tmp_path):
    out = tmp_path / "errors.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", "29741", str(WORKER), str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    worst = json.loads(out.read_text())
    expected = {
        "infonce", "infonce_hardneg_smooth", "simcse_hardneg_fixed_temp",
        "infonce_own_temperature", "siglip", "siglip_hardneg_own", "infonce_queue",
    }  # fmt: skip
    assert set(worst) == expected
    # float64 throughout: the loss and every averaged gradient equal the global-batch ones.
    bad = {name: err for name, err in worst.items() if not err <= 1e-6}
    assert not bad, bad
