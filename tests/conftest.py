"""Shared fixtures. Real data lives outside the repo, in ``../shared/data`` (``CLIPKIT_DATA``)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
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


def launch_report(stderr: str, tail: int = 1500) -> str:
    """What a failed ``torch.distributed.run`` launch said, each rank's own error first.

    The launcher's stderr ends with the surviving ranks' secondary errors ("Connection closed
    by peer") and its own traceback, so the tail alone hides the rank that failed first.
    """
    ranks: dict[str, list[str]] = {}
    for line in stderr.splitlines():
        m = re.match(r"\[(rank\d+)\]:", line)
        if m:
            ranks.setdefault(m.group(1), []).append(line)
    parts = ["\n".join(lines[-12:]) for _, lines in sorted(ranks.items())]
    return "\n---\n".join([*parts, stderr[-tail:]])


def _free_port() -> int:
    """A port nobody listens on now: fixed ports collide when test runs overlap on one host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """Run ``script *args`` under ``torch.distributed.run`` with ``nproc`` local CPU processes.

    One thread per process (2 cores, N processes), a free rendezvous port on 127.0.0.1, extra
    ``env`` on top of this process's environment. Fails the test with each rank's error and
    the tail of stderr when the launch exits non-zero.
    """

    def run(
        script: str | Path,
        *args: object,
        nproc: int = 2,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: int = 300,
    ) -> subprocess.CompletedProcess:
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)),
            *("--master_addr", "127.0.0.1", "--master_port", str(_free_port())),
            str(script),
            *(str(a) for a in args),
        ]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        res = subprocess.run(
            cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
        )
        assert res.returncode == 0, launch_report(res.stderr)
        return res

    return run
