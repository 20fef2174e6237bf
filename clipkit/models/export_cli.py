"""``clipkit export``: a trained model as an open_clip, Hugging Face transformers or ONNX folder.

Examples:
    clipkit export runs/mine --format hf --output exports/mine-hf
    clipkit export runs/mine --format onnx --output exports/mine-onnx
    clipkit export runs/mine --format open_clip --output exports/mine-open_clip

RUN_OR_EXPORT is anything ``clipkit eval --model`` takes: a run folder (its export/), an export
or checkpoint folder, an HF CLIPModel folder, open_clip:ARCH (with --weights). Every folder gets
a model card (README.md: architecture, data, steps, the run's final metrics, this command) and
is laid out as huggingface-cli upload expects. --format hf needs a ViT image tower and CLIP's
text transformer; other architectures are refused in one line, before any work. The folder is
written beside DIR under a temporary name and renamed at the end: a failed or refused export
leaves nothing in DIR.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

FORMATS = ("open_clip", "hf", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clipkit export``."""
    parser.add_argument("source", metavar="RUN_OR_EXPORT", help="run, export or checkpoint folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--weights", default="", help="local weights file for open_clip:ARCH")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it exists and is not empty"
    )


def check_output(out: Path, source: str, overwrite: bool) -> None:
    """Refuse an unusable ``--output`` before any work (one line).

    Raises:
        ValueError: DIR is a file, a non-empty folder without ``--overwrite``, the model's own
            folder (or holds it), or its parent cannot be written.
    """
    from clipkit.train.outputs import check_output_dir

    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a folder")
    src = Path(source).expanduser()
    if src.exists():
        s, o = src.resolve(), out.resolve()
        if s == o or o in s.parents:
            raise ValueError(f"--output {out} is the model's folder or holds it; choose another")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--output {out} exists and is not empty (--overwrite replaces it)")
    check_output_dir(out.parent, "--output's parent")


def _write(model: Any, fmt: str, folder: Path, final: Path) -> None:
    """Write ``fmt`` into ``folder``, which will be renamed ``final``."""
    from clipkit.models.export_hf import write_hf
    from clipkit.models.export_onnx import write_onnx

    if fmt == "open_clip":
        model.export(folder, location=final)  # an HF text tower's config names its folder
    elif fmt == "hf":
        write_hf(model, folder)
    else:
        from clipkit.embed.embedder import model_fingerprint

        write_onnx(model, folder, model_id=model_fingerprint(model))


def refusal(model: Any, fmt: str) -> str:
    """Why ``model`` cannot be written as ``fmt`` (one phrase), or ``""``."""
    from clipkit.models.dual_encoder import DualEncoder
    from clipkit.models.export_hf import hf_refusal
    from clipkit.models.export_onnx import onnx_refusal

    if not isinstance(model, DualEncoder):
        return f"it is a {type(model).__name__}, not an image-text (CLIP) model"
    if fmt == "hf":
        return hf_refusal(model)
    if fmt == "onnx":
        return onnx_refusal(model)
    return ""


def export(source: str, fmt: str, output: str | Path, weights: str = "", overwrite: bool = False,
           command: str = "") -> Path:  # fmt: skip
    """Export the model at ``source`` as ``fmt`` into ``output`` (whole or not at all).

    Args:
        source: a model argument (:func:`clipkit.models.load.load_model`).
        fmt: ``open_clip``, ``hf`` or ``onnx``.
        output: the folder to write (absent, empty, or replaced with ``overwrite``).
        weights: local weights file for ``open_clip:ARCH``.
        overwrite: replace a non-empty ``output``.
        command: the command line recorded in the model card.

    Returns:
        ``output`` as a path.

    Raises:
        ValueError: a bad output, an unloadable model or a combination that does not map (one
            line naming it); nothing is left in ``output`` or beside it.
    """
    from clipkit.models.load import load_model
    from clipkit.models.model_card import render
    from clipkit.train.outputs import as_write_error, sweep_stale, write_failed

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: takes {', '.join(FORMATS)}")
    out = Path(output).expanduser()
    check_output(out, source, overwrite)
    model, loaded = load_model(source, weights, seed=0)
    why = refusal(model, fmt)
    if why:
        raise ValueError(f"cannot export {loaded} as {fmt}: {why}")
    model.eval()
    sweep_stale(out.parent, f".{out.name}.export-*")  # what a killed export left
    tmp = out.parent / f".{out.name}.export-tmp{os.getpid()}"
    old = out.parent / f".{out.name}.export-old{os.getpid()}"
    try:
        tmp.mkdir()
        _write(model, fmt, tmp, out.resolve())
        files = [p.name for p in tmp.iterdir()]
        card = render(model, loaded, fmt, command or f"clipkit export {source} ...", files)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():  # --overwrite (checked), or an empty folder
            out.rename(old)
        tmp.rename(out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)  # the previous folder back in place
        os_err = as_write_error(err, out.parent) if isinstance(err, Exception) else None
        if os_err is not None:
            raise write_failed(f"export {fmt}", out.parent, os_err) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def run(args: argparse.Namespace) -> int:
    """Export, then print where the folder went."""
    argv = ["clipkit", "export", *sys.argv[2:]] if sys.argv[1:2] == ["export"] else None
    command = shlex.join(argv) if argv else (
        f"clipkit export {shlex.quote(args.source)} --format {args.format} "
        f"--output {shlex.quote(args.output)}"
    )  # fmt: skip
    out = export(args.source, args.format, args.output, args.weights, args.overwrite, command)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    n = sum(1 for p in out.rglob("*") if p.is_file())
    print(f"exported {args.source} as {args.format} to {out} ({n} files, {size / 2**20:.1f} MiB)")
    return 0
