"""Check a folder of WebDataset shards (or one tar); exit 1 when anything is wrong.

    python -m data_tools.verify SHARD_DIR_OR_TAR [--grid out.png] [--grid-n 24] [--workers N]

Per shard: samples, images that do not decode, samples without an image or a caption (a
labelled sample needs none), incomplete samples cut where a tar broke, key collisions (within
and across shards), unreadable/truncated tars, and disagreement with ``sizes.json``. A tar of an
ImageFolder tree is read as the evaluators and ``build_shards`` read it (the input layer's
damage policy), so all report the same counts. Prints a small table; ``--grid`` writes a
contact sheet of sample images with their captions (the path is checked before any reading).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from clipkit.data.shards import TAR_SUFFIXES
from clipkit.data.sources import (
    Record,
    detect_kind,
    expand_shards,
    image_bytes,
    open_source,
    sample_record,
)
from clipkit.data.tar_samples import TarStats, tar_samples
from clipkit.train.outputs import check_output_file, write_file


def check_shard(path: str, grid_n: int = 0) -> dict[str, Any]:
    """Read one shard fully (grouped by :func:`clipkit.data.tar_samples.tar_samples`); decode
    every image.

    Args:
        path: the ``.tar`` file.
        grid_n: keep this many (image bytes, caption) pairs for a contact sheet.

    Returns:
        ``{"shard", "samples", "keys", "undecodable", "no_image", "no_caption", "duplicates",
        "incomplete", "error", "examples", "problems"}``; ``samples`` counts the samples read,
        ``incomplete`` those cut where the tar broke (not read, so not in ``samples``).
    """
    res: dict[str, Any] = {
        "shard": Path(path).name,
        "samples": 0,
        "undecodable": 0,
        "no_image": 0,
        "no_caption": 0,
        "duplicates": 0,
        "incomplete": 0,
        "error": "",
        "keys": [],
        "examples": [],
        "problems": [],
    }
    stats = TarStats()
    seen: set[str] = set()
    for rec in _records(path, stats, res["problems"]):
        key = rec.key
        res["samples"] += 1
        if key in seen:  # the same key again, after other samples
            res["duplicates"] += 1
            res["problems"].append(f"{key}: duplicate key")
        seen.add(key)
        res["keys"].append(key)
        img = image_bytes(rec.image) if rec.image is not None else None
        if img is None:
            res["no_image"] += 1
            res["problems"].append(f"{key}: no image")
        else:
            try:
                im = Image.open(io.BytesIO(img))
                im.load()
            except Exception as err:  # PIL raises many exception types on bad bytes
                res["undecodable"] += 1
                res["problems"].append(f"{key}: undecodable image ({type(err).__name__})")
                img = None
        if not rec.captions and rec.label is None:
            res["no_caption"] += 1
            res["problems"].append(f"{key}: no caption")
        if img is not None and len(res["examples"]) < grid_n:
            res["examples"].append((img, "\n".join(rec.captions)))
    for member in stats.duplicate_members:  # a field repeated within one sample
        res["duplicates"] += 1
        res["problems"].append(f"duplicate member {member.rpartition(':')[2]}")
    res["incomplete"] = stats.partial_samples
    if stats.problems:
        p = stats.problems[0]
        res["error"] = f"{p.kind}: {p.reason}"
        res["problems"] += [
            f"{p.dropped_key}: incomplete sample" for p in stats.problems if p.dropped_key
        ]
    return res


def _records(path: str, stats: TarStats, problems: list[str]) -> Iterator[Record]:
    """The records of one tar: an ImageFolder tar through the input layer, a shard grouped by
    :func:`~clipkit.data.tar_samples.tar_samples` (a bad ``cls`` is reported, not raised)."""
    try:
        folder_tar = detect_kind(path) == "imagefolder-tar"
    except ValueError:  # not a tar at all: tar_samples counts it as unreadable
        folder_tar = False
    if folder_tar:
        yield from open_source(path, "imagefolder-tar").records(stats)
        return
    for sample in tar_samples([path], stats):
        try:
            yield sample_record(sample)
        except ValueError as err:
            problems.append(str(err))
            yield sample_record({k: v for k, v in sample.items() if k != "cls"})


def contact_sheet(examples: list[tuple[bytes, str]], out: Path, tile: int = 160) -> None:
    """Write a grid of thumbnails with their (first) captions under each."""
    from PIL import ImageDraw

    from clipkit.data.decode import open_pil

    cols = min(6, max(1, len(examples)))
    rows = -(-len(examples) // cols)
    text_h = 44
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (data, caption) in enumerate(examples):
        img = open_pil(data)
        img.thumbnail((tile - 4, tile - 4))
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        sheet.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        lines = textwrap.wrap(caption.split("\n")[0], 26)[:3]
        draw.multiline_text((x + 3, y + tile), "\n".join(lines), fill="black", spacing=1)
    fmt = grid_format(out)
    write_file(out, lambda tmp: sheet.save(tmp, format=fmt), "contact sheet")


def grid_format(path: Path) -> str:
    """The image format PIL writes for ``path``'s extension.

    Raises:
        ValueError: an extension PIL cannot write (one line naming the path).
    """
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"--grid {path}: unknown image extension (use .png or .jpg)")
    return fmt


def verify(shard_dir: Path, workers: int = 0, grid_n: int = 0) -> tuple[list[dict], list[str]]:
    """Check every ``*.tar`` in ``shard_dir``.

    Returns:
        ``(per-shard results, dataset-level problems)``.

    Raises:
        ValueError: ``shard_dir`` is not a folder of shards.
    """
    one_tar = shard_dir.is_file() and shard_dir.name.endswith(TAR_SUFFIXES)
    if one_tar:
        shards = [str(shard_dir)]
    elif not shard_dir.is_dir():
        raise ValueError(f"not a directory or a .tar file: {shard_dir}")
    else:
        try:
            shards = expand_shards(str(shard_dir))
        except ValueError:
            raise ValueError(f"no .tar shards in {shard_dir}") from None
    per_grid = -(-grid_n // len(shards)) if grid_n else 0
    workers = min(workers or os.cpu_count() or 1, len(shards))
    bar = tqdm(total=len(shards), unit="shard", desc="verify", disable=len(shards) < 4)
    results = []
    if workers == 1:
        for s in shards:
            results.append(check_shard(s, per_grid))
            bar.update()
    else:
        with get_context("fork").Pool(workers) as pool:
            for r in pool.imap(partial(check_shard, grid_n=per_grid), shards):
                results.append(r)
                bar.update()
    bar.close()
    problems = []
    counts = Counter(k for r in results for k in r["keys"])
    collisions = [k for k, c in counts.items() if c > 1]
    if collisions:
        problems.append(f"{len(collisions)} keys appear in several shards, e.g. {collisions[:3]}")
    sizes_file = shard_dir / "sizes.json"
    if one_tar:
        pass  # one tar checked on its own: no dataset around it to need sizes.json
    elif sizes_file.is_file():
        try:
            sizes = json.loads(sizes_file.read_text())
        except ValueError as err:
            sizes = {}
            problems.append(f"sizes.json: not valid JSON ({err})")
        for r in results:
            if r["shard"] in sizes and int(sizes[r["shard"]]) != r["samples"]:
                problems.append(
                    f"sizes.json says {sizes[r['shard']]} samples in {r['shard']}, found "
                    f"{r['samples']}"
                )
            elif r["shard"] not in sizes:
                problems.append(f"sizes.json has no entry for {r['shard']}")
    else:
        problems.append("no sizes.json (the train loader needs it or data.num_samples)")
    return results, problems


def _table(results: list[dict]) -> str:
    cols = ["shard", "samples", "undecodable", "no_image", "no_caption", "duplicates", "incomplete"]
    rows = [[str(r[c]) for c in cols] + [r["error"][:40]] for r in results]
    tot = ["TOTAL"] + [str(sum(r[c] for r in results)) for c in cols[1:]]
    tot.append(f"{sum(bool(r['error']) for r in results)} unreadable")
    head = [*cols, "error"]
    show = rows if len(rows) <= 20 else rows[:10] + [["..."] * len(head)] + rows[-5:]
    widths = [max(len(x[i]) for x in [head, tot, *show]) for i in range(len(head))]

    def fmt(r):
        return "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()

    return "\n".join([fmt(head), *map(fmt, show), fmt(tot)])


def main(argv: list[str] | None = None, fail: bool = True) -> int:
    """CLI entry point: 0 when clean, 1 when a problem was found, 2 on bad arguments."""
    p = argparse.ArgumentParser(
        prog="python -m data_tools.verify", description=__doc__.splitlines()[0]
    )
    p.add_argument("shard_dir", type=Path)
    p.add_argument("--grid", type=Path, default=None, help="write a contact sheet PNG here")
    p.add_argument("--grid-n", type=int, default=24)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.grid:  # before reading any shard, not after
            check_output_file(args.grid, "--grid")
            grid_format(args.grid)
        results, problems = verify(args.shard_dir, args.workers, args.grid_n if args.grid else 0)
    except ValueError as err:
        print(f"verify: error: {err}", file=sys.stderr)
        return 2
    print(_table(results))
    for r in results:
        for msg in r["problems"][:5]:
            problems.append(f"{r['shard']}: {msg}")
        if r["error"]:
            problems.append(f"{r['shard']}: unreadable ({r['error']})")
    if args.grid:
        ex = [e for r in results for e in r["examples"]][: args.grid_n]
        try:
            if ex:
                contact_sheet(ex, args.grid)
        except ValueError as err:  # the write failed (OutputError): one line, no .tmp left
            print(f"verify: error: {err}", file=sys.stderr)
            return 2
        print(f"contact sheet of {len(ex)} samples -> {args.grid if ex else 'not written'}")
    bad = any(
        r[c]
        for r in results
        for c in ("undecodable", "no_image", "no_caption", "duplicates", "incomplete", "error")
    ) or bool(problems)
    for msg in problems[:30]:
        print(f"PROBLEM: {msg}")
    print("FAIL" if bad else "OK")
    return 1 if (bad and fail) else 0


if __name__ == "__main__":
    raise SystemExit(main())
