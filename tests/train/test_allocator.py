"""keep_freed_memory: inside, a step's freed blocks are reused (no fresh pages); outside, glibc's
defaults (large blocks unmapped on free, faulted in again on the next allocation)."""

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipkit.train.allocator import _glibc, keep_freed_memory

torch.manual_seed(0)
NET = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1)
)
X = torch.randn(32, 3, 64, 64)  # activations (32, 32, 64, 64): 16 MiB each, above mmap's threshold
PAGES = 32 * 32 * 64 * 64 * 4 // resource.getpagesize()  # the pages of one activation


def _faults_of_one_step() -> int:
    """Minor page faults of one training step of a small conv net (forward, backward)."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    NET(X).square().mean().backward()
    NET.zero_grad(set_to_none=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


@pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is what is tuned (Linux/glibc only)")
def test_freed_memory_is_reused_inside_and_returned_outside():
    # A fresh process: glibc's thresholds in this one depend on every earlier test that trained
    # (the full suite's pytest process faulted only half as often outside as a fresh one).
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from tests.train.test_allocator import measure\n"
        "print(json.dumps(measure()))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    inside, outside = json.loads(res.stdout.strip().splitlines()[-1])
    # Inside: most steps reuse all their pages; now and then one activation lands on new
    # heap (a freed block a few bytes short of an aligned request): medians, not maxima.
    # Measured over 8 fresh runs: inside 0 (a step at most 8192), outside 8194-61456 per step.
    assert statistics.median(inside) < PAGES // 10, (inside, PAGES)
    # Outside: glibc unmaps each activation on free, so every step faults them in again.
    assert statistics.median(outside) > PAGES, (outside, PAGES)


def measure() -> tuple[list[int], list[int]]:
    """Page faults of 9 steps inside the context (after 3 that grow the heap), then 9 after."""
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    with keep_freed_memory() as tuned:
        assert tuned
        for _ in range(3):
            _faults_of_one_step()
        inside = [_faults_of_one_step() for _ in range(9)]
    return inside, [_faults_of_one_step() for _ in range(9)]


def test_disabled_is_a_no_op():
    with keep_freed_memory(False) as tuned:
        assert tuned is False


def test_the_trainer_default_and_switch(tmp_path, monkeypatch):
    import contextlib

    from clipkit.config import load_config
    from clipkit.train import loop

    seen = []

    @contextlib.contextmanager
    def record(enabled: bool = True):
        seen.append(enabled)
        yield enabled

    monkeypatch.setattr(loop, "keep_freed_memory", record)
    # train() enters the context before anything else: a setup error still passes through it.
    for extra, want in (([], True), (["train.keep_freed_memory=false"], False)):
        cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.precision=fp8", *extra])
        assert cfg.train.keep_freed_memory is want
        with pytest.raises(ValueError, match="train.precision='fp8'"):
            loop.train(cfg)
    assert seen == [True, False]
