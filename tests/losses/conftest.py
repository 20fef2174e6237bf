"""Loss tests run many tiny tiled ops: one thread avoids OpenMP barrier stalls on a busy box.

Also the memory check shared by the tiled-loss tests (:class:`LargestOutput`).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(autouse=True)
def _one_thread():
    # With 2 threads on 2 shared, loaded cores a 100 x 100 tiled loss took ~5 s instead of 0.02 s.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements any aten op produces (the tiled-memory check)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture
def largest_output() -> type[LargestOutput]:
    """``with largest_output() as mode: ...; mode.largest``: no op may build an N x M tensor."""
    return LargestOutput
