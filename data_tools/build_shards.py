"""Write img2dataset-style WebDataset shards from an image folder, a caption table or COCO JSON.

    python -m data_tools.build_shards INPUT OUTPUT_DIR [--shard-size 1000] [--max-side 0]
        [--quality 95] [--workers N] [--images DIR] [--no-shuffle] [--overwrite]

INPUT is any input :mod:`clipkit.data.sources` reads: an ImageFolder directory or a tar of one
(label -> ``key.cls``, class name -> caption), a ``.tsv``/``.csv`` caption table (``filepath`` +
``title``/``caption`` columns; the rule is :mod:`clipkit.data.tables`), a COCO captions ``.json``,
an image folder or shards. An image with several captions is one sample: ``key.txt`` holds them
newline-joined (as CLIP_benchmark does), ``key.json`` as a list (``"captions"``); training draws
one per step. Output: ``NNNNN.tar`` (``key.{jpg,png,webp}``, ``key.txt``, ``key.json``
[, ``key.cls``]), ``NNNNN_stats.json`` per shard, and ``sizes.json`` + ``_stats.json`` for the
dataset. Undecodable or missing images are skipped and listed in ``_stats.json``; they never
abort the run. A damaged input tar is read by the input layer's one damage policy (readable
samples kept, ``skipped_shards`` / ``incomplete_samples`` in ``_stats.json``, one warning naming
it), so the counts match the evaluators', ``verify``'s and ``clipkit embed``'s.

Example (CIFAR-10, 50,000 labelled samples in 50 shards)::

    python -m data_tools.build_shards ../shared/data/cifar10/train.tar /tmp/cifar10-train
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from clipkit.data.sources import Record, damage_report, image_bytes
from clipkit.data.tar_samples import TarStats
from clipkit.train.outputs import check_output_folder, write_failed, write_text
from data_tools.sources import read_input

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def prepare_image(data: bytes, max_side: int, quality: int) -> tuple[bytes, str, dict[str, int]]:
    """Validate (full decode) and optionally re-encode one image.

    Images in JPEG/PNG/WebP that fit ``max_side`` keep their bytes; others are EXIF-rotated,
    converted to RGB, shrunk to ``max_side`` (Lanczos) and stored as JPEG.

    Args:
        data: encoded image bytes.
        max_side: longest side after re-encoding; 0 keeps the size.
        quality: JPEG quality when re-encoding.

    Returns:
        ``(bytes, extension, {"width", "height", "original_width", "original_height"})``.

    Raises:
        ValueError: the bytes are not a decodable image.
    """
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except Exception as err:  # PIL raises many exception types on bad bytes
        raise ValueError(f"undecodable image: {type(err).__name__}: {err}") from err
    ow, oh = img.size
    if fmt in KEEP_FORMATS and not (max_side and max(ow, oh) > max_side):
        return (
            data,
            KEEP_FORMATS[fmt],
            {"width": ow, "height": oh, "original_width": ow, "original_height": oh},
        )
    from clipkit.data.decode import to_rgb

    img = to_rgb(ImageOps.exif_transpose(img))
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    w, h = img.size
    return (
        buf.getvalue(),
        "jpg",
        {"width": w, "height": h, "original_width": ow, "original_height": oh},
    )


def write_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Write one shard; returns its stats (``count``, ``failures``...). Runs in a worker."""
    out, index, records = Path(task["out"]), task["index"], task["records"]
    name = f"{index:05d}.tar"
    failures: list[dict[str, str]] = []
    key_digits = max(4, len(str(task["shard_size"] - 1)))
    # Written under a name no shard glob matches, renamed when whole.
    tmp = out / f"{name}.tmp{os.getpid()}"
    try:
        count, n_captions = _write_samples(tmp, task, records, failures, key_digits)
        tmp.replace(out / name)
    finally:
        tmp.unlink(missing_ok=True)
    stats = {
        "shard": name,
        "count": count,
        "captions": n_captions,
        "failed": len(failures),
        "failures": failures,
    }
    write_text(out / f"{index:05d}_stats.json", json.dumps(stats, indent=1), f"shard {name}")
    return stats


def _write_samples(
    path: Path, task: dict[str, Any], records: list[Record], failures: list, key_digits: int
) -> tuple[int, int]:
    """Write one shard's samples to ``path``; returns ``(samples, captions)`` written."""
    index, count, n_captions = task["index"], 0, 0
    with wds.TarWriter(str(path)) as tw:
        for i, rec in enumerate(records):
            rec: Record
            try:
                # A path is read here so a missing file fails with its own message.
                data = Path(rec.image).read_bytes() if isinstance(rec.image, str) else None
                data = data if data is not None else image_bytes(rec.image)
                img, ext, dims = prepare_image(data, task["max_side"], task["quality"])
            except (OSError, ValueError) as err:
                failures.append({"source": rec.ref, "reason": str(err)[:200]})
                continue
            key = f"{index:05d}{i:0{key_digits}d}"
            meta = {**rec.meta, "key": key, "source": rec.ref, "status": "success", **dims}
            meta["caption"] = rec.captions[0] if rec.captions else None
            meta["captions"] = rec.captions
            sample = {"__key__": key, ext: img, "txt": "\n".join(rec.captions), "json": meta}
            if rec.label is not None:
                meta["label"], meta["classname"] = rec.label, task["classes"][rec.label]
                sample["cls"] = str(rec.label)
            tw.write(sample)
            count += 1
            n_captions += len(rec.captions)
    return count, n_captions


def build(
    input_path: Path,
    out: Path,
    *,
    shard_size: int = 1000,
    max_side: int = 0,
    quality: int = 95,
    workers: int = 0,
    image_root: Path | None = None,
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build shards from ``input_path`` into ``out``; see the module docstring.

    Args:
        input_path: ImageFolder dir/tar, caption TSV/CSV or COCO JSON.
        out: output directory (created).
        shard_size: samples per shard.
        max_side: re-encode images whose longest side exceeds this (0: never).
        quality: JPEG quality of re-encoded images.
        workers: processes (0: all cores).
        image_root: where caption-table / COCO image paths are relative to.
        shuffle: shuffle samples (seeded) before sharding so shards mix classes.
        seed: shuffle seed.
        overwrite: replace shards already in ``out``.
        progress: show a tqdm bar.

    Returns:
        The dataset stats written to ``_stats.json``.

    Raises:
        ValueError: bad input, bad options, or ``out`` already holds shards.
    """
    if shard_size <= 0:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    if max_side < 0 or not 1 <= quality <= 100:
        raise ValueError(f"bad --max-side {max_side} / --quality {quality}")
    t0 = time.time()
    check_output_folder(out, "OUTPUT_DIR")  # before the input is read
    old = sorted(out.glob("*.tar")) if out.is_dir() else []
    if old and not overwrite:
        raise ValueError(f"{out} already holds {len(old)} shards; pass --overwrite to replace them")
    damage = TarStats()  # damaged input tars: counted, named in one warning, in _stats.json
    records, classes, kind = read_input(input_path, image_root, damage)
    if not records:
        raise ValueError(f"{input_path}: no images found")
    out.mkdir(parents=True, exist_ok=True)
    for p in [*old, *out.glob("*_stats.json"), out / "sizes.json"]:
        p.unlink(missing_ok=True)
    if shuffle:
        random.Random(seed).shuffle(records)
    tasks = [
        {
            "out": str(out),
            "index": i // shard_size,
            "records": records[i : i + shard_size],
            "shard_size": shard_size,
            "max_side": max_side,
            "quality": quality,
            "classes": classes,
        }
        for i in range(0, len(records), shard_size)
    ]
    workers = workers or os.cpu_count() or 1
    results = []
    bar = tqdm(total=len(records), unit="img", desc="build_shards", disable=not progress)
    try:
        if workers == 1 or len(tasks) == 1:
            for t in tasks:
                results.append(write_shard(t))
                bar.update(len(t["records"]))
        else:
            with get_context("fork").Pool(min(workers, len(tasks))) as pool:
                for i, st in enumerate(pool.imap(write_shard, tasks)):
                    results.append(st)
                    bar.update(len(tasks[i]["records"]))
    except BaseException as err:
        # A failed build leaves no shard set that looks whole (old shards were cleared above).
        for f in [*out.glob("*.tar"), *out.glob("*.tar.tmp*"), *out.glob("*_stats.json*")]:
            f.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_failed("shards", out, err) from None
        raise
    finally:
        bar.close()
    sizes = {st["shard"]: st["count"] for st in results}
    write_text(out / "sizes.json", json.dumps(sizes, indent=1), "build_shards")
    stats = {
        "input": str(input_path),
        "kind": kind,
        "count": sum(sizes.values()),
        "captions": sum(st["captions"] for st in results),
        "shards": len(sizes),
        "failed": sum(st["failed"] for st in results),
        "failures": [f for st in results for f in st["failures"]],
        **damage_report(damage),
        "classes": classes,
        "shard_size": shard_size,
        "max_side": max_side,
        "seconds": round(time.time() - t0, 2),
    }
    write_text(out / "_stats.json", json.dumps(stats, indent=1), "build_shards")
    return stats


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input, one line on stderr)."""
    p = argparse.ArgumentParser(
        prog="python -m data_tools.build_shards", description=__doc__.splitlines()[0]
    )
    p.add_argument("input", type=Path, help="ImageFolder dir/tar, caption .tsv/.csv, COCO .json")
    p.add_argument("output_dir", type=Path)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--max-side", type=int, default=0, help="re-encode larger images (0: never)")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    p.add_argument("--images", type=Path, default=None, help="image root for tables/COCO")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        st = build(
            args.input,
            args.output_dir,
            shard_size=args.shard_size,
            max_side=args.max_side,
            quality=args.quality,
            workers=args.workers,
            image_root=args.images,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as err:
        print(f"build_shards: error: {err}", file=sys.stderr)
        return 2
    damaged = (
        f", {st['skipped_shards']} damaged input tar(s) "
        f"({st['incomplete_samples']} incomplete sample(s) lost; see the warning)"
        if st["skipped_shards"]
        else ""
    )
    print(
        f"{st['count']} samples ({st['captions']} captions) in {st['shards']} shards, "
        f"{st['failed']} skipped{damaged}, {st['seconds']} s -> {args.output_dir}"
    )
    for f in st["failures"][:10]:
        print(f"  skipped {f['source']}: {f['reason']}")
    for problem in st["skipped_shard_examples"]:
        print(f"  damaged {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
