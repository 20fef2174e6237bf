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
            torch.testing.assert_close(
                two[case][name], ref[name], rtol=1e-5, atol=1e-6, msg=f"{case} {name}"
            )
        if case.startswith("siglip"):
            assert "clip.logit_bias" in ref
