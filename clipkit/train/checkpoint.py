"""Atomic checkpoints with keep-last-k and ``resume=latest|PATH``.

A checkpoint is a folder ``<run>/checkpoints/step_XXXXXXX/`` holding Accelerate's state (model,
optimizer, scheduler, scaler, RNG of every process), ``trainer_state.json`` (step, epoch,
samples seen, data position) and the resolved ``config.yaml``. It is written to a temporary
folder and renamed into place, so a crash never leaves a half checkpoint that ``latest`` picks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
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


def save_checkpoint(
    accelerator: Any,
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int = 2,
) -> Path:
    """Save all training state for ``step`` atomically; prune to the newest ``keep_last``."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f"{PREFIX}{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        (tmp / "config.yaml").write_text(config_yaml)
        # The state file goes last: its presence marks a complete checkpoint.
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep_last > 0:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # safetensors/pickle raise many types on truncated files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"corrupt checkpoint {path}: {first}") from None
    return state
