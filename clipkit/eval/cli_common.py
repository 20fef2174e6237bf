"""What ``clipkit eval zeroshot`` and ``clipkit eval retrieval`` share: model loading, options,
precision, and the CLIP_benchmark-shaped result JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of every ``clipkit eval`` command."""
    parser.add_argument(
        "--model",
        required=True,
        help="export folder, training run folder (uses <run>/export), checkpoint folder "
        "(config.yaml + model.safetensors) or open_clip:ARCH",
    )
    parser.add_argument("--pretrained", default="", help="local weights file for open_clip:ARCH")
    parser.add_argument("--data", required=True, help="evaluation data (layouts above)")
    parser.add_argument("--output", required=True, help="result JSON path")
    parser.add_argument(
        "--dataset-name", default="", help="name in the JSON (default: from --data)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument(
        "--bootstrap", type=int, default=0, metavar="N", help="N resamples for 95%% CIs"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap and random-init seed")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def check_common(args: argparse.Namespace) -> None:
    """Validate shared options before any work; raises ValueError with one line."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0 (got {args.workers})")
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0 (got {args.bootstrap})")
    out_dir = Path(args.output).expanduser().resolve().parent
    if not out_dir.is_dir():
        raise ValueError(f"--output folder does not exist: {out_dir}")


def pick_device(spec: str) -> torch.device:
    if spec:
        return torch.device(spec)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_checkpoint(path: Path) -> Any:
    """A training checkpoint: rebuild the model from its config.yaml, then load its weights."""
    from safetensors.torch import load_file

    from clipkit.config.loader import load_config
    from clipkit.models import build_dual_encoder

    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"checkpoint {path} has config.yaml but no model.safetensors")
    cfg = load_config(path / "config.yaml")
    if cfg.task != "clip":
        raise ValueError(f"checkpoint {path} is a '{cfg.task}' model, not an image-text model")
    model = build_dual_encoder(cfg.model, cfg.loss)
    state = load_file(str(weights))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise ValueError(f"checkpoint {weights} does not fit its config.yaml (key '{bad}')")
    return model


def load_model(spec: str, pretrained: str = "", seed: int = 0) -> Any:
    """A DualEncoder from ``--model``/``--pretrained``.

    Args:
        spec: export folder (``open_clip_config.json`` + weights), run folder holding
            ``export/``, checkpoint folder (``config.yaml`` + ``model.safetensors``), or
            ``open_clip:ARCH`` (an open_clip or clipkit architecture name).
        pretrained: for ``open_clip:ARCH``, a local weights file; empty means random weights
            drawn with ``seed`` (useful for tests, meaningless as a score).
        seed: seed of the random initialisation.

    Raises:
        ValueError: nothing loadable at ``spec``, or ``pretrained`` is not a local file.
    """
    from clipkit.config.schema import ModelConfig
    from clipkit.models import build_dual_encoder, load_dual_encoder
    from clipkit.models.dual_encoder import EXPORT_CONFIG

    if spec.startswith("open_clip:"):
        arch = spec.split(":", 1)[1]
        if pretrained and not Path(pretrained).expanduser().is_file():
            raise ValueError(f"--pretrained must be a local weights file; not found: {pretrained}")
        if not pretrained:
            print(f"warning: {arch} with random weights (seed {seed})", file=sys.stderr)
        torch.manual_seed(seed)
        return build_dual_encoder(ModelConfig(name=arch, pretrained=pretrained))
    if pretrained:
        raise ValueError("--pretrained applies only to --model open_clip:ARCH")
    p = Path(spec).expanduser()
    if (p / EXPORT_CONFIG).is_file():
        return load_dual_encoder(p)
    if (p / "export" / EXPORT_CONFIG).is_file():
        return load_dual_encoder(p / "export")
    if (p / "config.yaml").is_file():
        return _load_checkpoint(p)
    raise ValueError(
        f"--model {spec}: not an export folder ({EXPORT_CONFIG}), a run folder with export/, "
        "a checkpoint folder (config.yaml) or open_clip:ARCH"
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16; nothing for fp32 (the default, and what the agreement test uses)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def library_versions() -> dict[str, str]:
    import numpy
    import open_clip

    import clipkit

    return {
        "clipkit": clipkit.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": numpy.__version__,
    }


def dataset_name(args: argparse.Namespace) -> str:
    if args.dataset_name:
        return args.dataset_name
    p = Path(args.data.split("{")[0].rstrip("/"))
    name = p.stem if p.suffix else p.name
    return name if name not in ("test", "captions", "") else (p.parent.name or name)


def result_payload(
    args: argparse.Namespace, task: str, metrics: dict[str, float], **extra: Any
) -> dict[str, Any]:
    """CLIP_benchmark's result shape plus clipkit's additions (top-level keys)."""
    out = {
        "dataset": dataset_name(args),
        "model": args.model,
        "pretrained": args.pretrained,
        "task": task,
        "metrics": metrics,
        "language": "en",
        "precision": args.precision,
    }
    out.update(extra)
    out["versions"] = library_versions()
    return out


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write atomically, so a crash never leaves half a result file."""
    p = Path(path).expanduser()
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(p)


class SkipLog:
    """Passes batches through, remembering which images were unreadable and which shards broke."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.keys: list[str] = []
        self.shard_keys: list[str] = []  # one line per truncated/unreadable shard

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            if isinstance(b, dict):
                self.keys.extend(b.get("skipped_keys", []))
                self.shard_keys.extend(b.get("skipped_shard_keys", []))
            yield b


def skip_report(skipped: int, log: SkipLog) -> tuple[dict[str, Any], list[str]]:
    """Result-JSON fields and stderr warnings for what an evaluation could not read.

    Returns:
        ``({"skipped", "skipped_examples", "skipped_shards", "skipped_shard_examples"},
        warning lines)``.
    """
    extra = {
        "skipped": skipped,
        "skipped_examples": log.keys[:10],
        "skipped_shards": len(log.shard_keys),
        "skipped_shard_examples": log.shard_keys[:10],
    }
    lines = []
    if skipped:
        example = log.keys[0] if log.keys else "?"
        lines.append(
            f"warning: skipped {skipped} unreadable or incomplete sample(s), e.g. {example}"
        )
    if log.shard_keys:
        lines.append(
            f"warning: {len(log.shard_keys)} shard(s) truncated or unreadable, read up to the "
            f"damage, e.g. {log.shard_keys[0]}"
        )
    return extra, lines
