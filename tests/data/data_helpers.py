"""Shard-writing helpers for the data tests (a uniquely named module: several test folders
have a conftest.py, so ``from conftest import ...`` is ambiguous)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image


def coco_photos(data_root: Path, n: int, side: int = 96) -> list[bytes]:
    """``n`` JPEGs cut from the COCO-mini photos (cycled), varying sizes around ``side``."""
    files = sorted((data_root / "coco_mini" / "train2017").glob("*.jpg"))
    out = []
    for i in range(n):
        img = Image.open(files[i % len(files)]).convert("RGB")
        w = side + (i * 7) % side
        img = img.resize((w, int(w * img.height / img.width) + 1))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_shards(
    out: Path,
    images: list[bytes],
    per_shard: int,
    *,
    cls: bool = True,
    ext: str = "jpg",
    key_offset: int = 0,
) -> list[str]:
    """Write ``NNNNN.tar`` shards (key.<ext>, key.txt[, key.cls]) and sizes.json."""
    out.mkdir(parents=True, exist_ok=True)
    sizes, names = {}, []
    for s in range(0, len(images), per_shard):
        name = f"{s // per_shard:05d}.tar"
        with wds.TarWriter(str(out / name)) as tw:
            for i, img in enumerate(images[s : s + per_shard], start=s):
                k = i + key_offset
                sample = {"__key__": f"{k:06d}", ext: img, "txt": f"photo number {k}"}
                if cls:
                    sample["cls"] = str(k % 10)
                tw.write(sample)
        sizes[name] = len(images[s : s + per_shard])
        names.append(name)
    (out / "sizes.json").write_text(json.dumps(sizes))
    return names


def toy_tokenizer(texts: list[str]):
    """Deterministic stand-in tokenizer: (B, 8) of character codes."""
    import torch

    rows = [[ord(c) % 1000 for c in t[:8]] + [0] * (8 - len(t[:8])) for t in texts]
    return torch.tensor(rows, dtype=torch.long)
