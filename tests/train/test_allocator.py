"""keep_freed_memory: inside, a step's freed blocks are reused (no fresh pages); outside, glibc's
defaults (large blocks unmapped on free, faulted in again on the next allocation)."""

import resource
import statistics

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
    with keep_freed_memory() as tuned:
        assert tuned
        for _ in range(3):
            _faults_of_one_step()  # the first steps grow the heap to the step's peak
        inside = [_faults_of_one_step() for _ in range(9)]
    outside = [_faults_of_one_step() for _ in range(9)]
    # Inside: most steps reuse all their pages; now and then one activation lands on new
    # heap (a freed block a few bytes short of an aligned request): medians, not maxima.
    # Measured over 8 runs: inside 0 (a step at most 8192), outside 8194-61456 per step.
    assert statistics.median(inside) < PAGES // 10, (inside, PAGES)
    # Outside: glibc unmaps each activation on free, so every step faults them in again.
    assert statistics.median(outside) > PAGES, (outside, PAGES)


def test_disabled_is_a_no_op():
    with keep_freed_memory(False) as tuned:
        assert tuned is False


def test_the_trainer_default_and_switch(tmp_path):
    from clipkit.config import load_config

    assert load_config().train.keep_freed_memory is True
    assert load_config(None, ["train.keep_freed_memory=false"]).train.keep_freed_memory is False
