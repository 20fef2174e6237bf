"""Small ImageFolder tars cut from the real CIFAR-10 tars: evaluator, SSL and SLIP tests."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path


def cut_imagefolder_tar(
    src: Path, dst: Path, per_class: int, classes: set[str] | None = None
) -> Path:
    """Copy the first ``per_class`` images of each class (of ``classes``; default all)."""
    seen: Counter[str] = Counter()
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            p = Path(m.name)  # ./<class>/ or ./<class>/<image>
            cls = p.name if m.isdir() else p.parent.name
            if classes is not None and cls and cls not in classes:
                continue
            if m.isdir():
                tout.addfile(m)
            elif m.isfile() and seen[cls] < per_class:
                seen[cls] += 1
                tout.addfile(m, tin.extractfile(m))
    return dst


def cifar_cuts(data_root: Path, out: Path, train: int = 20, test: int = 10) -> tuple[Path, Path]:
    """``(train.tar, test.tar)`` with ``train`` / ``test`` images per class under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tr = cut_imagefolder_tar(data_root / "cifar10" / "train.tar", out / "train.tar", train)
    te = cut_imagefolder_tar(data_root / "cifar10" / "test.tar", out / "test.tar", test)
    return tr, te
