"""One measurement per fresh process: what bench/loss.py and bench/ssl_loss.py share.

A case runs in its own interpreter (``script --case IMPL ...``) so its peak resident memory
(``VmHWM`` above the starting ``VmRSS``) is its own, and an address-space cap turns an
out-of-memory case into a table cell instead of a dead benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``, ``VmSize``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def spawn(script: str, args: list[str], threads: int) -> dict:
    """Run ``python script *args`` and return the last JSON line it prints.

    Returns ``{"oom": True}`` when the case ran out of memory (or was killed for it) and
    ``{"error": last stderr line}`` when it failed otherwise.
    """
    cmd = [sys.executable, script, *args, "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        if "memory" in tail.lower() or res.returncode in (-9, 137):
            return {"oom": True}
        return {"error": tail}
    return json.loads(lines[-1])


def cell(r: dict, cap_mb: int, fmt: str = "{mb:,.0f} / {s:.2f}", width: int = 40) -> str:
    """A table cell for one result: ``fmt`` filled from it, or OOM / the error."""
    if r.get("oom"):
        return f"OOM (>{cap_mb:,} MB)"
    if "error" in r:
        return f"error: {r['error'][:width]}"
    return fmt.format(**r)
