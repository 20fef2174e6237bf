"""A run's outputs on disk: checked before work starts, written whole or not at all.

Issue 17: a full disk used to end a run in a traceback and leave a half-written checkpoint that
kept the disk full, so ``train.resume=latest`` crashed too. The rules here:

* :func:`check_output_dir` runs before any work: a folder that cannot be created or written is
  one line naming it.
* Every write of the trainer (checkpoint, export, metrics) that fails with an ``OSError`` becomes
  an :class:`OutputError` (:func:`write_failed`): one line naming the folder and, for a full
  disk, the bytes needed and free; the CLI prints it and exits 2.
* :func:`sweep_stale` removes what a killed or failed writer left (``*.tmp``) before a run
  needs space; :func:`truncate_jsonl` rewrites a log atomically.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken for a full disk


class OutputError(ValueError):
    """An output of the run could not be written; the message is one line naming the folder.

    A ``ValueError`` so the CLIs' one-line error path (exit 2) reports it.

    Attributes:
        all_ranks: every process raises the same message (printed once, by rank 0).
    """

    def __init__(self, message: str, *, all_ranks: bool = False) -> None:
        super().__init__(message)
        self.all_ranks = all_ranks


def human_bytes(n: int) -> str:
    """``72745123`` -> ``'69.4 MiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover  (the loop always returns)


def dir_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (0 if it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # removed while walking
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
    return total


def _free_bytes(path: Path) -> int | None:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_failed(
    what: str,
    folder: Path,
    err: OSError,
    needed: int | None = None,
    needed_what: str = "",
    hint: str = "",
) -> OutputError:
    """The one-line :class:`OutputError` for a failed write.

    Args:
        what: what was being written (``checkpoint step 200``).
        folder: where.
        err: the error the write raised.
        needed: bytes the write needs, when known (e.g. the last complete checkpoint's size).
        needed_what: where ``needed`` comes from, shown in parentheses.
        hint: what to do once the cause is gone (``resume with train.resume=latest``); shown
            after "free space, then" for a full disk, "fix that, then" otherwise.

    Example:
        >>> write_failed("metrics", Path("/r"), OSError(errno.ENOSPC, "No space left on device"))
    """
    reason = err.strerror or str(err) or type(err).__name__
    msg = f"{what}: cannot write {folder}: {reason}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        parts = []
        if needed:
            src = f", {needed_what}" if needed_what else ""
            parts.append(f"needs about {human_bytes(needed)} ({needed} bytes{src})")
        free = _free_bytes(folder)
        if free is not None:
            parts.append(f"{human_bytes(free)} free")
        if parts:
            msg += "; " + ", ".join(parts)
    if hint:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        msg += f"; {'free space' if full else 'fix that'}, then {hint}"
    return OutputError(msg)


def as_write_error(err: BaseException, folder: Path) -> OSError | None:
    """``err`` as the ``OSError`` of a failed write, or None when it is something else.

    ``torch.save`` reports a full disk as ``RuntimeError`` ("unexpected pos ...",
    "PytorchStreamWriter failed writing file"), safetensors as ``SafetensorError``; neither is an
    ``OSError``. Such an error counts as ENOSPC when ``folder``'s filesystem is (nearly) full
    now, measured before anything is cleaned up.
    """
    if isinstance(err, OSError):
        return err
    free = _free_bytes(folder)
    if free is not None and free < FULL_BELOW:
        first = (str(err).strip().splitlines() or [""])[0]
        return OSError(
            errno.ENOSPC, f"No space left on device ({type(err).__name__}: {first[:120]})"
        )
    return None


def check_output_dir(path: Path, name: str = "train.output_dir") -> None:
    """Create ``path`` if needed and prove it writable, before any work is done.

    A probe file is created and removed: permission bits say nothing for root, and neither they
    nor ``os.access`` see every read-only mount. A full disk passes (see below).

    Raises:
        OutputError: one line naming ``name`` and the folder (same on every rank).
    """
    if path.exists() and not path.is_dir():
        raise OutputError(f"{name}={path} is a file, not a folder", all_ranks=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            # Writable, only full: the run first removes what a killed run left (stale .tmp
            # folders), and a write that still fails names the space it needs.
            return
        reason = err.strerror or str(err)
        raise OutputError(f"{name}={path} is not writable: {reason}", all_ranks=True) from None


def check_output_file(path: str | Path, flag: str = "--output") -> None:
    """Fail in one line, before any work, when ``path`` cannot take a result file.

    A folder in its place, a missing parent or an unwritable parent (probed by creating and
    removing a file there: permission bits say nothing for root or read-only mounts) would
    otherwise be found only after the whole evaluation (issue 17). Used by every CLI that
    writes one file (``clipkit eval --output``, ``data_tools.verify --grid``).

    Raises:
        OutputError: one line naming ``flag`` and the path.
    """
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        raise OutputError(f"{flag} {p} is a folder; give a file path such as {p / 'result.json'}")
    if not p.parent.is_dir():
        raise OutputError(f"{flag} folder does not exist: {p.parent}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.check", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{flag} folder is not writable: {p.parent} ({err.strerror})") from None


def check_fresh_start(run_dir: Path, resume: str) -> None:
    """Refuse to start a run afresh (``train.resume`` empty) in a folder holding an earlier run.

    A fresh start used to append its steps to the old ``metrics.jsonl`` (two runs' step 1 in one
    log), write checkpoints beside the old ones (a later ``train.resume=latest`` could pick the
    old run's newer step) and replace its export. There is no overwrite option: the earlier run
    is continued with ``train.resume=latest`` or kept, with the new run in a new folder.

    Raises:
        OutputError: one line naming the folder and what it holds (same on every rank).
    """
    if resume:
        return
    found = [
        name
        for name in ("metrics.jsonl", "metrics.json")
        if (run_dir / name).is_file() and (run_dir / name).stat().st_size
    ]
    ckpts = run_dir / "checkpoints"
    steps = sorted(
        p.name
        for p in (ckpts.glob("step_*") if ckpts.is_dir() else [])
        if p.is_dir() and not p.name.endswith(".tmp")
    )
    if steps:
        found.append(f"{len(steps)} checkpoint(s) up to {steps[-1]}")
    if (run_dir / "export").is_dir():
        found.append("export/")
    if found:
        raise OutputError(
            f"train.output_dir={run_dir} already holds a run ({', '.join(found)}); continue it "
            "with train.resume=latest, or give this run a new train.output_dir",
            all_ranks=True,
        )


def check_output_folder(path: str | Path, flag: str = "--output") -> None:
    """Fail in one line, before any work, when ``path`` cannot become an output folder.

    Unlike :func:`check_output_dir` nothing is created: the folder, or its nearest existing
    parent when it is not there yet, is probed for a write, so a bad path leaves no empty folder
    behind. A full disk passes (the write that needs the space names it).

    Raises:
        OutputError: ``path`` (or a parent) is a file, or the folder is not writable; one line
            naming ``flag`` and the path.
    """
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {p} is a file, not a folder")
    base = p
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{flag} {p}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_check.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return
        raise OutputError(f"{flag} {p} is not writable: {err.strerror or err} ({base})") from None


def write_file(path: Path, write: Callable[[Path], None], what: str) -> None:
    """Write a file whole or not at all: ``write(tmp)`` then rename; an ``OSError`` is one line.

    Args:
        path: the final file.
        write: writes the content to the temporary path it is given (``tmp`` keeps ``path``'s
            suffix, so writers that pick a format by extension still work).
        what: what is being written, for the message (``contact sheet``).

    Raises:
        OutputError: the write failed (an ``OSError``, or another error while the disk is full:
            :func:`as_write_error`); no temporary file is left after any error.
    """
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # Writers that are not plain Python (faiss, torch) report a full disk in their own way.
        failed = as_write_error(err, path.parent) if isinstance(err, Exception) else None
        if failed is None:
            raise
        raise write_failed(what, path.parent, failed) from None


def sweep_stale(folder: Path, pattern: str = "*.tmp*") -> list[Path]:
    """Remove what an interrupted writer left in ``folder`` (files or folders); return them.

    Only the run's own temporary names reach here, so nothing a person made is touched.
    """
    gone = []
    if not folder.is_dir():
        return gone
    for p in sorted(folder.glob(pattern)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def write_text(path: Path, text: str, what: str) -> None:
    """Write ``text`` atomically (temp file, then rename); an ``OSError`` is one line.

    Raises:
        OutputError: the write failed; no temp file is left.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_failed(what, path.parent, err, len(text.encode())) from None


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool], what: str) -> int:
    """Keep only the JSON lines of ``path`` for which ``keep(record)`` holds (atomically).

    A torn last line (the process died mid-write) is dropped too. Returns the lines dropped.

    Raises:
        OutputError: the rewrite failed (the old file is intact).
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and keep(rec):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(x + "\n" for x in kept), what)
    return dropped
