"""Shared fixtures. Real data lives outside the repo, in ``../shared/data`` (``CLIPKIT_DATA``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> tuple[Path, bool]:
    env = os.environ.get("CLIPKIT_DATA")
    if env:
        return Path(env), True
    return REPO.parent / "shared" / "data", False


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Root of the real data sets. Fails (not skips) when CLIPKIT_DATA is set but missing."""
    root, explicit = _data_root()
    if not root.is_dir():
        if explicit:
            pytest.fail(f"CLIPKIT_DATA={root} does not exist")
        pytest.skip(f"real data not found at {root}; set CLIPKIT_DATA")
    return root


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2 cores beside other work; keep torch from oversubscribing them."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(min(prev, 2))
    yield
    torch.set_num_threads(prev)
