"""What the CIFAR-10 training benches (bench/slip.py, bench/wise_ft.py) share: progress lines
printed as they happen, and the caption shards exactly as bench/train.py builds (and caches) them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def say(*args: object) -> None:
    """Print and flush (the benches run for minutes under ``tee``)."""
    print(*args, flush=True)


def train_shards(cache: Path) -> str:
    """The CIFAR-10 train caption shards' spec, built by bench/train.py's ``build_shards``."""
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_shards(cache)
