"""Shard specs, sizes and the per-epoch plan: which reader reads which shards, how many batches.

A *reader* is one data-loading worker of one rank (``world_size x max(workers, 1)`` readers).
In epoch mode the shard list is shuffled with ``(seed, epoch)`` and split by rank, then by
worker; each reader gets a *quota* of batches, equal-summed across ranks so every rank steps the
same number of times (drop_last). In resampled mode each reader draws shards with replacement.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


@dataclass
class Source:
    """One ``::``-separated part of a shard spec."""

    spec: str
    urls: list[str]
    weight: float = 1.0
    # Samples per url (None when unknown).
    sizes: list[int] | None = None
    # Record inputs (ImageFolder folder or tar, image folder): their records in the input
    # layer's order; ``urls`` are then parts of them (:func:`part_url`), not tars.
    records: list[Any] | None = None
    classes: list[str] | None = None  # label i is classes[i] (ImageFolder inputs)


@dataclass
class Plan:
    """What every reader of one rank does in one epoch."""

    # Per logical reader: shard urls in reading order (epoch mode) or candidate urls (resampled).
    urls: list[list[str]]
    # Per logical reader: batches to produce (None: read to the end, partial last batch).
    quotas: list[int | None]
    # Resampled mode: per-url weights of each reader (None in epoch mode).
    weights: list[list[float]] | None = None
    num_batches: int | None = None
    counts: list[int] = field(default_factory=list)
    # Eval with fewer shards than readers: every reader reads all shards and keeps the samples
    # whose index is ``offset`` modulo ``step`` (``(offset, step)`` per reader), skipping the
    # others undecoded.
    strides: list[tuple[int, int]] | None = None


def is_url(path: str) -> bool:
    """True for ``pipe:``, ``http(s)://``, ``s3://``... (anything but a local path)."""
    return bool(_URL.match(path)) and not re.match(r"^[a-zA-Z]:[\\/]", path)


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def tar_end_ok(path: str) -> bool:
    """True when a local tar ends with its end-of-archive marker (two zero blocks).

    Python's streaming tar reader takes a file cut at a header boundary for a clean end, so a
    truncated shard would otherwise lose its tail silently. Compressed tars (.tar.gz, ...) are
    not checked here (True): a cut one fails in its decompressor, which the readers count.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if f.read(6).startswith(COMPRESSED_MAGIC):
                return True
            if size < 1024 or size % 512:
                return False
            f.seek(size - 1024)
            return f.read(1024) == bytes(1024)
    except OSError:
        return False


TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")


def _natural(s: str) -> list[Any]:
    # 2.tar before 10.tar for unpadded shard names.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def expand_shards(spec: str) -> list[str]:
    """Shard paths/URLs of a spec, in order.

    Each ``::`` part is a folder (its ``*.tar`` in natural order), or is expanded by webdataset
    (braces, ``$WDS_`` variables) and then by glob for local ``*?[`` patterns.

    Raises:
        ValueError: empty spec, a missing local shard (named), or no shard at all.
    """
    if not spec or not spec.strip():
        raise ValueError("empty shard spec")
    urls: list[str] = []
    for part in (s.strip() for s in spec.split("::")):
        p = Path(part).expanduser()
        if not is_url(part) and p.is_dir():
            found = [str(q) for q in p.iterdir() if q.name.endswith(TAR_SUFFIXES)]
            urls += sorted(found, key=_natural)
            continue
        for url in expand_urls(part):
            if is_url(url):
                urls.append(url)
                continue
            local = str(Path(url).expanduser())
            hits = sorted(glob.glob(local), key=_natural) if glob.has_magic(local) else [local]
            if not hits or not Path(hits[0]).is_file():
                raise ValueError(f"shard not found: {hits[0] if hits else url} (from '{part}')")
            urls += hits
    if not urls:
        raise ValueError(f"no .tar shards found at {spec}")
    return urls


def _read_sizes(urls: list[str]) -> list[int] | None:
    """Samples per shard from ``sizes.json`` beside local shards; None if any is unknown."""
    cache: dict[Path, dict[str, int]] = {}
    out = []
    for url in urls:
        if is_url(url):
            return None
        p = Path(url).expanduser()
        f = p.parent / "sizes.json"
        if f not in cache:
            if not f.is_file():
                return None
            try:
                cache[f] = json.loads(f.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"{f}: not a valid sizes.json ({err})") from err
        if p.name not in cache[f]:
            return None
        out.append(int(cache[f][p.name]))
    return out


# Input-layer kinds the training stream reads record by record (random access by offset or
# path), and how many parts one is cut into: parts play the role of shards in the plan (split
# across ranks and workers, drawn in resampled mode), so 256 allows up to 256 readers.
RECORD_KINDS = ("imagefolder", "imagefolder-tar", "images")
MAX_PARTS = 256
_PART = re.compile(r"^(.*)#(\d+)/(\d+)$")


def part_url(spec: str, part: int, parts: int) -> str:
    """The plan's name for part ``part`` of ``parts`` of a record input."""
    return f"{spec}#{part}/{parts}"


def split_part(url: str) -> tuple[str, int, int] | None:
    """``(spec, part, parts)`` of a :func:`part_url`, or None for anything else."""
    m = _PART.match(url)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def part_range(part: int, parts: int, n: int) -> range:
    """Positions of part ``part`` in a record input of ``n`` records (contiguous, sizes differ by
    at most one)."""
    return range(part * n // parts, (part + 1) * n // parts)


def _record_source(part: str, weight: float) -> Source | None:
    """A :class:`Source` for an ImageFolder folder/tar or image folder; None for shards.

    The kind is the input layer's (:func:`clipkit.data.sources.detect_kind`); an ImageFolder tar
    has no sizes.json, its records come from the header scan (members by offset).
    """
    from clipkit.data.sources import detect_kind, open_source  # sources imports this module

    p = Path(part).expanduser()
    if is_url(part) or "{" in part or glob.has_magic(part) or not p.exists():
        return None
    try:
        kind = detect_kind(part)
    except ValueError:
        return None  # expand_shards says what is wrong with it
    if kind in ("shards", "clip-benchmark"):
        return None
    if kind not in RECORD_KINDS:
        raise ValueError(
            f"data.train: '{part}' is a {kind} input; training reads WebDataset shards, "
            "ImageFolder folders or tars, and image folders (data_tools.build_shards converts it)"
        )
    src = open_source(part, kind)
    records = [r for r in src.items or [] if r.image is not None]
    n = len(records)
    parts = min(n, MAX_PARTS)
    urls = [part_url(part, j, parts) for j in range(parts)]
    sizes = [len(part_range(j, parts, n)) for j in range(parts)]
    return Source(part, urls, weight, sizes, records=records, classes=src.classes)


def parse_spec(spec: str, weights: list[float] | None = None) -> list[Source]:
    """Split a shard spec into sources, expand braces and read ``sizes.json``.

    A part that is an ImageFolder folder or tar, or a folder of images, becomes a record source
    (:data:`RECORD_KINDS`) read through the input layer, cut into parts that the plan treats
    as shards.

    Args:
        spec: ``"a/{00000..00127}.tar::pipe:curl -s http://host/b-{0..9}.tar"``.
        weights: one sampling weight per source (resampled mode), or empty.

    Returns:
        One :class:`Source` per ``::`` part.

    Raises:
        ValueError: empty spec, weights of the wrong length or negative, missing local shards.
    """
    if not spec or not spec.strip():
        raise ValueError("data.train: empty shard spec")
    parts = [s.strip() for s in spec.split("::")]
    weights = list(weights or [])
    if weights and len(weights) != len(parts):
        raise ValueError(
            f"data.weights: {len(weights)} weights for {len(parts)} sources in '{spec}'"
        )
    if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
        raise ValueError(f"data.weights: weights must be >= 0 with a positive sum, got {weights}")
    sources = []
    for i, part in enumerate(parts):
        if not part:
            raise ValueError(f"data.train: empty source #{i} in '{spec}'")
        w = float(weights[i]) if weights else 1.0
        rec = _record_source(part, w)
        if rec is not None:
            sources.append(rec)
            continue
        try:
            urls = expand_shards(part)
        except ValueError as err:
            raise ValueError(f"data.train: {err}") from None
        sources.append(Source(part, urls, w, _read_sizes(urls)))
    return sources


def _num_readers(world_size: int, workers: int) -> int:
    return world_size * max(workers, 1)


def plan_epoch(
    sources: list[Source],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    workers: int,
    batch_size: int,
    train: bool,
    num_samples: int = 0,
) -> Plan:
    """Assign shards to this rank's readers for one epoch (epoch mode).

    Every rank computes the same global assignment, so quotas agree without communication.

    Raises:
        ValueError: fewer shards than readers, or too few samples for one batch per rank.
    """
    urls = [u for s in sources for u in s.urls]
    sizes_known = all(s.sizes is not None for s in sources)
    if sizes_known:
        sizes = [n for s in sources for n in s.sizes]
    elif num_samples > 0:
        # Unknown per-shard counts: assume equal shards (open_clip does the same).
        sizes = [num_samples // len(urls) + (i < num_samples % len(urls)) for i in range(len(urls))]
    else:
        sizes = None
    W = max(workers, 1)
    readers = _num_readers(world_size, workers)
    if train and len(urls) < readers:
        raise ValueError(
            f"data.train has {len(urls)} shards but {world_size} ranks x {W} workers = {readers} "
            "readers; epoch mode needs at least one shard per reader (lower data.workers, "
            "write more shards, or set data.resampled=true)"
        )
    order = list(range(len(urls)))
    if train:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)

    def reader_shards(r: int, w: int) -> list[int]:
        return order[r::world_size][w::W]

    mine = [[urls[i] for i in reader_shards(rank, w)] for w in range(W)]
    if not train and len(urls) < readers:
        total = sum(sizes) if sizes else None
        strides = [(rank * W + w, readers) for w in range(W)]
        counts = [(total - g + n - 1) // n for g, n in strides] if total is not None else []
        nb = sum(-(-c // batch_size) for c in counts) if counts else None
        return Plan([list(urls)] * W, [None] * W, num_batches=nb, counts=counts, strides=strides)
    if not train:
        counts = [sum(sizes[i] for i in reader_shards(rank, w)) for w in range(W)] if sizes else []
        nb = sum(-(-c // batch_size) for c in counts) if sizes else None
        return Plan(mine, [None] * W, num_batches=nb, counts=counts)
    if sizes is None:
        raise ValueError(
            f"data.train: no sizes.json beside the shards of '{sources[0].spec}' "
            "and data.num_samples is 0; set data.num_samples"
        )
    quotas = []
    for r in range(world_size):
        quotas.append([sum(sizes[i] for i in reader_shards(r, w)) // batch_size for w in range(W)])
    num_batches = min(sum(q) for q in quotas)
    if num_batches == 0:
        raise ValueError(
            f"data.train: {sum(sizes)} samples are too few for one batch of {batch_size} "
            f"on each of {world_size} ranks"
        )
    mq = quotas[rank]
    # Trim the largest quotas first so every rank steps num_batches times.
    while sum(mq) > num_batches:
        mq[max(range(W), key=lambda w: (mq[w], -w))] -= 1
    counts = [sum(sizes[i] for i in reader_shards(rank, w)) for w in range(W)]
    return Plan(mine, mq, num_batches=num_batches, counts=counts)


def plan_resampled(
    sources: list[Source],
    *,
    world_size: int,
    workers: int,
    batch_size: int,
    num_samples: int,
) -> Plan:
    """Every reader samples shards with replacement; source ``i`` is drawn with prob ∝ weight.

    Raises:
        ValueError: when the epoch length is unknown (no sizes.json and no data.num_samples).
    """
    if num_samples <= 0:
        if any(s.sizes is None for s in sources):
            raise ValueError("data.resampled needs data.num_samples (samples per epoch)")
        num_samples = sum(sum(s.sizes) for s in sources)
    W = max(workers, 1)
    num_batches = num_samples // (batch_size * world_size)
    if num_batches == 0:
        raise ValueError(
            f"data.num_samples={num_samples} is too small for one batch of {batch_size} "
            f"on each of {world_size} ranks"
        )
    total = sum(s.weight for s in sources)
    urls, weights = [], []
    for s in sources:
        urls += s.urls
        weights += [s.weight / total / len(s.urls)] * len(s.urls)
    quotas = [num_batches // W + (w < num_batches % W) for w in range(W)]
    return Plan([urls] * W, quotas, weights=[weights] * W, num_batches=num_batches)
