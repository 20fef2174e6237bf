"""A lost process stops the run in one line: which rank, and the checkpoint to resume from.

Issue 15: when one of N training processes dies (SIGKILL, out of memory, a node gone), the others
fail inside a collective with a gloo/NCCL "Connection reset by peer" traceback, and torchrun
then SIGTERMs them and prints its own failure summary; nothing says what to do next. Under
:func:`rank_failure_guard` a survivor that sees a communication error (or the launcher's
SIGTERM) instead takes a *roll call* through the launcher's key-value store (each survivor
checks in; whoever does not within a few seconds is lost) and raises :class:`RankLostError`:

    error: lost rank 1 of 2 (gloo: Connection reset by peer); resume from
    runs/x/checkpoints/step_0000006 with train.resume=latest

printed once, by the lowest surviving rank (the CLI's one-line path, exit 2). A peer that hangs
instead of dying is caught by the collective timeout (``train.collective_timeout_s``), then
reported the same way. ``python -m clipkit.train.launch`` hides torchrun's summary.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from clipkit.train.checkpoint import list_checkpoints
from clipkit.train.outputs import OutputError

# What a collective raises when a peer is gone or silent (gloo and NCCL wordings).
_COMM = re.compile(
    r"connection (reset|closed|refused)|broken pipe|timed out|timeout|gloo|nccl|"
    r"socket|peer|ProcessGroup|store",
    re.IGNORECASE,
)
ROLL_CALL_S = 3.0  # how long survivors wait for each other to check in


class Terminated(BaseException):
    """SIGTERM (torchrun stopping the survivors of a failed process, or a scheduler); a
    BaseException so that ``except Exception`` handlers on the way up do not swallow it."""


class RankLostError(OutputError):
    """One or more processes are gone; the message names them and the checkpoint to resume
    from. Printed once, by the lowest surviving rank."""


def _is_comm_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, Terminated | dist.DistError):
        return True
    return isinstance(err, RuntimeError) and bool(_COMM.search(str(err)))


def _roll_call(rank: int, world: int, wait_s: float) -> list[int] | None:
    """Ranks that do not check in through the default store within ``wait_s``; None when the
    store is unreachable itself (the process hosting it is gone)."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"clipkit/alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not store.check([f"clipkit/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # the store's host died with the lost rank
        return None


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    # gloo prefixes its source location: "[/path/pair.cc:545] Read error [...]: Connection ..."
    text = re.sub(r"^\[[^\]]*\.cc:\d+\]\s*", "", text)
    return text.split(". ")[0][:160]  # gloo goes on: "This is typically caused by ..."


def describe(
    err: BaseException, rank: int, world: int, lost: list[int] | None, run_dir: Path
) -> str:
    """The one line: who is lost, why, and where to resume from."""
    done = list_checkpoints(run_dir)
    where = (
        f"resume from {done[-1]} with train.resume=latest"
        if done
        else f"no complete checkpoint in {run_dir / 'checkpoints'} yet: restart the run"
    )
    if isinstance(err, Terminated):
        why = "stopped by SIGTERM"
    else:
        why = f"{'gloo' if 'gloo' in repr(err) or '.cc:' in str(err) else 'collective'}: "
        why += _first_line(err)
    if lost is None:
        who = "lost the launcher's store (the node hosting it is gone)"
    elif lost:
        names = ", ".join(str(r) for r in lost)
        who = f"lost rank{'s' if len(lost) > 1 else ''} {names} of {world}"
    else:
        who = f"rank {rank} of {world}"
    return f"{who} ({why}); {where}"


@contextlib.contextmanager
def rank_failure_guard(run_dir: str | Path) -> Iterator[None]:
    """Turn a lost process into :class:`RankLostError` on every survivor (see the module doc).

    Outside a multi-process run, and for errors that are not communication failures (or when
    the roll call finds every rank alive after a non-SIGTERM error), the original exception
    goes on unchanged.
    """
    import torch.distributed as dist

    def on_term(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the report must not be cut
        raise Terminated()

    previous = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process keeps SIGTERM's default
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except BaseException as err:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            raise
        if not _is_comm_failure(err):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank, world = dist.get_rank(), dist.get_world_size()
        lost = _roll_call(rank, world, ROLL_CALL_S)
        if lost == [] and not isinstance(err, Terminated):
            raise  # everyone answered: not a lost process, keep the real error
        line = describe(err, rank, world, lost, Path(run_dir))
        alive = [r for r in range(world) if lost is None or r not in lost]
        if rank == min(alive, default=rank) and (lost is None or 0 in lost):
            # Rank 0's progress bar died mid-line: the report starts a line of its own.
            sys.stderr.write("\n")
            sys.stderr.flush()
        # Printed by the lowest survivor only (the CLI prints all_ranks errors on rank 0 alone).
        raise RankLostError(line, all_ranks=rank != min(alive, default=rank)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
