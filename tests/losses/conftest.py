"""Loss tests run many tiny tiled ops: one thread avoids OpenMP barrier stalls on a busy box."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # With 2 threads on 2 shared, loaded cores a 100 x 100 tiled loss took ~5 s instead of 0.02 s.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
