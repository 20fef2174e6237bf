"""The embedded demo data set: scikit-learn's 1,797 handwritten digits as WebDataset shards.

The images are real (8x8, 16 grey levels, from the UCI handwritten digits collection) and ship
inside scikit-learn, so the default run needs no download. Captions come from varied templates;
zero-shot evaluation uses *different* templates so the score measures whether the text tower
learnt the concept of each digit, not one caption string.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Training captions: the class appears as a word ("seven") or a numeral ("7").
TRAIN_TEMPLATES = [
    "a handwritten digit {word}",
    "the number {num} written by hand",
    "a scan of a handwritten {word}",
    "handwritten {num}",
    "a {word} drawn with a pen",
    "the digit {num}",
    "a low resolution image of the number {word}",
    "someone wrote the digit {word}",
    "a picture of {num}, the number {word}",
    "a small grey picture of a {num}",
]

# Zero-shot prompts: none of these strings occurs in training captions.
EVAL_TEMPLATES = [
    "a photo of the number {}.",
    "an image showing a {}.",
    "a drawing of the digit {}.",
    "this is a {}.",
]

UPSCALE = 2  # 8x8 -> 16x16, nearest neighbour keeps the original pixels
VERSION = "2"  # bump when the shard contents change, so caches are rebuilt


def _caption(label: int, rng: random.Random) -> str:
    tpl = rng.choice(TRAIN_TEMPLATES)
    return tpl.format(word=CLASSNAMES[label], num=label)


def _png(img8: np.ndarray) -> bytes:
    # sklearn's pixels are 0..16; scale to 0..255 and upsample so a patch sees whole strokes.
    arr = np.clip(img8 * (255.0 / 16.0), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, mode="L").resize((8 * UPSCALE, 8 * UPSCALE), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def prepare_digits(
    cache_dir: str | Path, *, test_fraction: float = 0.2, seed: int = 0, per_shard: int = 400
) -> dict[str, Path]:
    """Write the digits as shards once; return ``{"train": dir, "test": dir}``.

    Layout (img2dataset-compatible): ``<cache>/digits/{train,test}/NNNNN.tar`` holding
    ``key.png``, ``key.txt`` (caption), ``key.cls`` (label) and ``key.json``; plus ``sizes.json``.
    The split is stratified and fixed by ``seed``. A completed build is marked by ``_done`` and
    reused; a partial one is rebuilt. Safe to call from every process of a run at once: the
    first to take ``<cache>/digits/.lock`` builds, the others wait and reuse its build (without
    the lock, one rank's rebuild deleted the shards another rank was about to read).
    """
    from filelock import FileLock

    root = Path(cache_dir).expanduser() / "digits"
    dirs = {"train": root / "train", "test": root / "test"}
    done = root / "_done"

    def built() -> bool:
        return done.is_file() and done.read_text().strip() == VERSION

    if built():
        return dirs
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        if not built():  # re-checked: another process may have built it while this one waited
            _build(dirs, done, test_fraction=test_fraction, seed=seed, per_shard=per_shard)
    return dirs


def _build(
    dirs: dict[str, Path], done: Path, *, test_fraction: float, seed: int, per_shard: int
) -> None:
    """Write both splits' shards and ``sizes.json``, then the ``_done`` marker (caller holds the
    lock)."""
    import webdataset as wds
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    done.unlink(missing_ok=True)
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    rng = random.Random(seed)
    for split, ids in (("train", tr), ("test", te)):
        out = dirs[split]
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.tar"):
            old.unlink()
        sizes: dict[str, int] = {}
        for s in range(0, len(ids), per_shard):
            name = f"{s // per_shard:05d}.tar"
            chunk = ids[s : s + per_shard]
            with wds.TarWriter(str(out / name)) as sink:
                for i in chunk:
                    lab = int(labels[i])
                    sink.write(
                        {
                            "__key__": f"digit{i:05d}",
                            "png": _png(images[i]),
                            "txt": _caption(lab, rng),
                            "cls": str(lab),
                            "json": json.dumps({"label": lab, "classname": CLASSNAMES[lab]}),
                        }
                    )
            sizes[name] = len(chunk)
        (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    done.write_text(VERSION + "\n")


def shard_spec(split_dir: Path) -> str:
    """Brace-expanded spec for every shard of a split folder, e.g. ``.../{00000..00003}.tar``."""
    tars = sorted(split_dir.glob("*.tar"))
    if not tars:
        raise ValueError(f"no shards in {split_dir}")
    if len(tars) == 1:
        return str(tars[0])
    return f"{split_dir}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"
