"""Atomic checkpoints with keep-last-k and ``resume=latest|PATH``.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXX/`` holding Accelerate's state (model,
optimizer, scheduler, scaler, RNG of every process), ``trainer_state.json`` (step, epoch,
samples seen, data position) and the resolved ``config.yaml``. It is written to a temporary
folder and renamed into place, so a crash never leaves a half checkpoint that ``latest`` picks.
A write that fails (a full disk) removes its temporary folder and raises one
:class:`~clipkit.train.outputs.OutputError` on every process; :func:`sweep_stale_checkpoints`
removes the temporary folders a killed run left, before a new run needs their space (issue 17).
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from clipkit.train.outputs import as_write_error, dir_bytes, sweep_stale, write_failed

STATE_FILE = "trainer_state.json"
STATE_KEYS = ("step", "epoch", "samples_seen", "data")
PREFIX = "step_"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :].split(".")[0]))


def sweep_stale_checkpoints(run_dir: str | Path) -> list[Path]:
    """Remove ``step_XXXXXXX.tmp`` folders left by a killed or failed save; return them.

    Call on the main process before the run writes anything: on a full disk those folders hold
    the space the next checkpoint needs.
    """
    return sweep_stale(checkpoint_dir(run_dir), f"{PREFIX}*.tmp")


def save_checkpoint(
    accelerator: Any,
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 2,
) -> Path:
    """Save all training state for ``step`` atomically; prune to the newest ``keep_last``.

    Raises:
        OutputError: on every process when any process failed to write (e.g. ENOSPC): one line
            naming the folder and the size of the last complete checkpoint; the temporary
            folder is removed, the complete checkpoints are untouched.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f"{PREFIX}{step:07d}.tmp"
    main = accelerator.is_main_process
    err: Exception | None = None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if main:
            (tmp / "config.yaml").write_text(config_yaml)
            # The state file goes last: its presence marks a complete checkpoint.
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    except Exception as e:  # torch.save reports a full disk as RuntimeError, not OSError
        err = e
    disk = None if err is None else as_write_error(err, root)
    mine = None if err is None else _describe(disk or err)
    # Every process learns whether any failed: raising on one alone would leave the others
    # waiting in the next collective, and the folder must not be removed while others write.
    failed = _failures(accelerator, mine)
    if failed:
        bug = err if err is not None and disk is None else None
        # The traceback's frames hold the half-written file open: drop them, or its space
        # stays used after the folder is removed (and the free space shown is wrong).
        err = disk = None
        gc.collect()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if bug is not None:
            raise bug  # not the disk: a bug keeps its traceback
        done = list_checkpoints(run_dir)
        error = write_failed(
            f"checkpoint step {step}",
            root,
            OSError(*failed),  # the first failing process's error, so all print the same line
            dir_bytes(done[-1]) if done else None,
            f"the size of {done[-1].name}" if done else "",
            "resume with train.resume=latest",
        )
        error.all_ranks = True
        raise error
    if main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep_last > 0:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _describe(err: BaseException) -> tuple[int, str]:
    if isinstance(err, OSError):
        return err.errno or 0, err.strerror or str(err)
    return 0, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def _failures(accelerator: Any, mine: tuple[int, str] | None) -> tuple[int, str] | None:
    """``(errno, reason)`` of the first process that failed, the same on every process."""
    if accelerator.num_processes == 1:
        return mine
    flag = torch.tensor([0 if mine is None else 1], device=accelerator.device)
    if not accelerator.reduce(flag, "sum").item():
        return None  # the common case costs one small all-reduce, no object gather
    from accelerate.utils import gather_object

    return next(x for x in gather_object([mine]) if x is not None)


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``""`` -> None; ``"latest"`` -> newest complete checkpoint (None if none); else a path.

    Raises:
        ValueError: a given path that is not a complete checkpoint.
    """
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    p = Path(resume).expanduser()
    if not (p / STATE_FILE).is_file():
        raise ValueError(f"train.resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return p


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, Any]:
    """Restore Accelerate's state from ``path``; return the trainer state dict.

    Raises:
        ValueError: the checkpoint is unreadable (corrupt or truncated files), named in one line.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt checkpoint {path}: {STATE_FILE} unreadable ({err})") from None
    # Valid JSON is not yet a trainer state ({} or [] written by hand or a foreign tool).
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["data"], list):
        what = f"lacks {', '.join(missing)}" if missing else "has no per-rank data list"
        raise ValueError(f"corrupt checkpoint {path}: {STATE_FILE} {what}")
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # safetensors/pickle raise many types on truncated files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"corrupt checkpoint {path}: {first}") from None
    return state
