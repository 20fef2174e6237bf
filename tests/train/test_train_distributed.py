"""Multi-process exactness: N gloo processes give one process's global-batch gradients."""

from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def _run(tmp_path: Path, nproc: int, torchrun) -> dict:
    out = tmp_path / f"grads_{nproc}.pt"
    torchrun(WORKER, out, nproc=nproc)
    return torch.load(out)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, torchrun):
    """InfoNCE and SigLIP; 2 processes x 1 micro-batch and x 2 GradCache micro-batches."""
    one = _run(tmp_path, 1, torchrun)
    two = _run(tmp_path, 2, torchrun)
    assert one.keys() == two.keys() == {"infonce/1", "infonce/2", "siglip/1", "siglip/2"}
    for case in one:
        ref = one[case.split("/")[0] + "/1"]  # one process, whole batch, no accumulation
        assert ref.keys() == two[case].keys() and "clip.logit_scale" in ref
        for name in ref:
            got, want = two[case][name], ref[name]
            assert got.dtype == want.dtype == torch.float64
            # float64: only the summation order differs (DDP's all-reduce, the tiled loss's
            # chunks), so the norm-wise relative error is ~1e-15; 1e-10 leaves ample room.
            err = (got - want).norm() / want.norm().clamp_min(1e-300)
            assert err < 1e-10, f"{case} {name}: norm-wise relative error {err:.2e}"
        if case.startswith("siglip"):
            assert "clip.logit_bias" in ref
