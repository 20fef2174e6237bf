"""Command line of the trainer: ``[--config FILE] key=value ...`` -> ``train(cfg)``.

Shared by ``scripts/train.py`` (for ``accelerate launch``) and ``clipkit train``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from clipkit.config import ConfigError, load_config, split_cli

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def main(
    argv: list[str] | None = None, *, task: str | None = None, default: Path | None = None
) -> int:
    """Parse the command line, train, print where the outputs are. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("usage: scripts/train.py [--config FILE] [section.key=value ...]")
        return 0
    try:
        path, overrides = split_cli(argv)
        default = default or DEFAULT_CONFIG
        if path is None and default.is_file():
            path = str(default)
        if task is not None and not any(o.startswith("task=") for o in overrides):
            overrides = [f"task={task}", *overrides]
        cfg = load_config(path, overrides)
        from clipkit.train.loop import train

        result = train(cfg)
    except (ConfigError, ValueError, OSError) as err:
        # OSError: a disk or file problem the loop did not name itself (it names checkpoint,
        # export and metrics writes); still one line, never a traceback.
        _close_progress_bars()
        if _print_here(err):
            print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with train.resume=latest", file=sys.stderr)
        return 130
    from accelerate import PartialState

    if PartialState().is_main_process:
        out = Path(cfg.train.output_dir).resolve()
        shown = {
            k: v
            for k, v in result.items()
            if k.startswith(("eval/", "train/final")) and isinstance(v, int | float)
        }
        print("final metrics: " + " ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        print(f"outputs: {out}  (metrics.json, metrics.jsonl, checkpoints/, export/)")
    failed = {k: v for k, v in result.items() if k.endswith("/error")}
    if failed:
        # The state is safe (checkpoint and export come first); the exit status still says
        # that part of the run failed.
        for k, v in failed.items():
            print(f"error: {k.removesuffix('/error')} failed: {v}", file=sys.stderr)
        return 1
    return 0


def _print_here(err: BaseException) -> bool:
    """Whether this process prints ``err``: an error every process raises alike (a config
    error, an unwritable output) is printed by rank 0 only, so a launch of N processes shows
    one line, not N."""
    same_everywhere = isinstance(err, ConfigError) or getattr(err, "all_ranks", False)
    return not same_everywhere or os.environ.get("RANK", "0") == "0"


def _close_progress_bars() -> None:
    """End the loop's progress bar, so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _one_line(err: BaseException) -> str:
    return " ".join((str(err).strip() or type(err).__name__).splitlines())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", help="[--config FILE] key=value overrides")
    parser.add_argument("--config", default=None)


def run(args: argparse.Namespace) -> int:
    argv = (["--config", args.config] if args.config else []) + list(args.items)
    return main(argv)
