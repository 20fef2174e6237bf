"""FSDP2 on CPU: 2 gloo processes, the tiny dual encoder in float64 (tests/train/fsdp_worker.py).

FSDP2 and DDP reach the same parameters after 3 AdamW steps; a sharded checkpoint
(torch.distributed.checkpoint, one file per rank) written after step 2 resumes exactly into a
fresh model; the open_clip export of the FSDP run equals the DDP run's.

What does not run here, recorded for the GPU path: Accelerate 1.15 keeps DDP for an FSDP plugin
on CPU (``DistributedType.MULTI_CPU``; FSDP is chosen only on an accelerator), so the trainer's
``accelerate launch --config_file configs/accelerate/fsdp_8.yaml`` path needs a GPU; and FSDP2's
``fully_shard`` refuses open_clip's 0-d ``logit_scale`` ("fully_shard doesn't support scalar
parameters"), so the worker keeps the scalars out of the shards (``ignored_params``) and
averages their gradients itself, as DDP would.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import _free_port, launch_report

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, dict]:
    """One launch for every check below (process start-up dominates on 2 cores)."""
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, launch_report(res.stderr)
    return out, torch.load(out / "params.pt")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def test_fsdp2_equals_ddp_after_three_steps(fsdp_run):
    _, d = fsdp_run
    assert d["ddp"].keys() == d["fsdp"].keys() and "clip.logit_scale" in d["ddp"]
    moved = sum((d["ddp"][k] - d["init"][k]).norm().item() for k in d["ddp"])
    assert moved > 1e-3  # 3 AdamW steps at lr 1e-3 moved the weights
    for k, want in d["ddp"].items():
        got = d["fsdp"][k]
        assert got.dtype == want.dtype == torch.float64, k
        # float64, the same reduction (an average of 2 ranks' gradients): only the order of
        # summation may differ, ~1e-16; 1e-12 norm-wise leaves ample room.
        assert _rel(got, want) <= 1e-12, f"{k}: {_rel(got, want):.2e}"


def test_sharded_checkpoint_resumes_exactly(fsdp_run):
    _, d = fsdp_run
    assert d["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    for k, want in d["fsdp"].items():
        # The resumed model started from another seed: only the checkpoint made it equal, and
        # step 3 redone from the same state is the same float64 arithmetic (exact; 1e-12 bound).
        assert _rel(d["resumed"][k], want) <= 1e-12, k


def test_fsdp_export_equals_ddp_export(fsdp_run):
    out, _ = fsdp_run
    a = load_file(str(out / "export_ddp" / "open_clip_model.safetensors"))
    b = load_file(str(out / "export_fsdp" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert _rel(b[k], a[k]) <= 1e-12, k
    cfg_a = (out / "export_ddp" / "open_clip_config.json").read_text()
    assert cfg_a == (out / "export_fsdp" / "open_clip_config.json").read_text()


def test_accelerate_keeps_ddp_for_fsdp_on_cpu(fsdp_run):
    """The recorded limitation (see the module docstring). When Accelerate starts sharding on
    CPU this fails: then route the FSDP test through Accelerate."""
    _, d = fsdp_run
    assert d["accelerate"] == ("DistributedType.MULTI_CPU", "DistributedDataParallel")
