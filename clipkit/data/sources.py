"""The one input layer: detect what a spec is, expand it, and read it as ordered records.

Every reader of clipkit (evaluation, ``clipkit embed`` and its service, ``data_tools``) reads its
input here; the training stream keeps its webdataset pipeline (its resume positions count that
reader's samples) but shares :func:`expand_shards`' expansion and ``tar_end_ok``.

Kinds (:func:`detect_kind`):

==================  ==============================================================================
``imagefolder``     a folder ``<class>/<image>`` (classes = sorted sub-folder names)
``imagefolder-tar`` a tar of one (``./<class>/<image>`` members, read in place by offset)
``shards``          WebDataset shards with ``cls`` and/or ``txt`` captions: one ``.tar``, a brace
                    spec ``a/{000..009}.tar``, ``::``-joined specs, or a folder of ``.tar`` files
``clip-benchmark``  CLIP_benchmark's WebDataset layout: ``classnames.txt``, optional
                    ``zeroshot_classification_templates.txt``, ``<split>/{0..n-1}.tar`` (+
                    ``nshards.txt``)
``captions``        a caption TSV/CSV (column rule in :mod:`clipkit.data.tables`)
``coco``            a COCO captions JSON
``images``          a folder of images (recursive); ``x.txt`` / ``x.json`` beside ``x.jpg`` give
                    its captions (one per line) and metadata
``text``            a ``.txt`` file, one sentence per line (text-only records)
==================  ==============================================================================

Order is fixed: files sorted by path parts (so ``<class>/...`` is class-major), tar members by
class then name, shards in spec order and samples in tar order, tables in first-seen order.

Damage, one policy for every reader (evaluation, ``clipkit embed``, ``data_tools``): a truncated
or corrupt tar never raises; its readable samples are yielded, the damage is counted in a
:class:`~clipkit.data.tar_samples.TarStats` (damaged tars, incomplete samples) and the file is
named in one warning. A plain ImageFolder tar is read past garbage to its next valid header
(:mod:`clipkit.data.tarscan`); a shard stream stops at the damage (:mod:`~clipkit.data.
tar_samples`). Readers get the counts from :meth:`Source.records` (damage found while opening
and while streaming, in one ``stats``) and report them with :func:`damage_report`.

Parts: :mod:`clipkit.data.records` (the record type), :mod:`clipkit.data.tables` (the caption
column rule), :mod:`clipkit.data.tarscan` (ImageFolder tars by offset),
:mod:`clipkit.data.tar_samples` (shards), :func:`clipkit.data.shards.expand_shards` (specs).
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.data import tables
from clipkit.data.records import (
    CAPTION_FIELDS,
    IMAGE_EXTS,
    IMAGE_FIELDS,
    Record,
    image_bytes,
    is_image,
    sample_record,
    shard_records,
)
from clipkit.data.shards import TAR_SUFFIXES, expand_shards, is_url
from clipkit.data.tar_samples import TarProblem, TarStats, tar_samples
from clipkit.data.tarscan import TarMember, is_compressed, member_index, read_member, scan_tar

KINDS = (
    "imagefolder",
    "imagefolder-tar",
    "shards",
    "clip-benchmark",
    "captions",
    "coco",
    "images",
    "text",
)
# Sidecar files hashed in full-ish (first MiB) by the fingerprint; size + mtime cover the rest.
HASH_HEAD_BYTES = 1 << 20


def _folder_images(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file() and is_image(p.name)]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _taris_imagefolder(path: Path) -> bool:
    """An ImageFolder tar: its first members are all images inside a folder, with no label or
    caption members beside them (which would make them WebDataset samples)."""
    if is_compressed(path):
        names = []
        for s in tar_samples([path]):
            names += [f"{s['__key__']}.{k}" for k in s if not k.startswith("__")]
            if len(names) >= 64:
                break
    else:
        names = [m.name for m in scan_tar(path, limit=64)]
    return bool(names) and all("/" in n and is_image(n) for n in names)


def detect_kind(spec: str) -> str:
    """The kind of input ``spec`` is (see the module docstring).

    Raises:
        ValueError: the input does not exist or is of no known kind (one line naming it).
    """
    p = Path(spec).expanduser()
    if "::" in spec or "{" in spec or is_url(spec) or glob.has_magic(spec):
        return "shards"
    if p.is_file():
        name = p.name.lower()
        if name.endswith(TAR_SUFFIXES):
            return "imagefolder-tar" if _taris_imagefolder(p) else "shards"
        kind = {".tsv": "captions", ".csv": "captions", ".json": "coco", ".txt": "text"}
        if p.suffix.lower() in kind:
            return kind[p.suffix.lower()]
    elif p.is_dir():
        subdirs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
        # CLIP_benchmark: classnames.txt (classification) or <split>/ of tars (retrieval too).
        if (p / "classnames.txt").is_file() or any(
            (d / "nshards.txt").is_file() or any(d.glob("*.tar")) for d in subdirs
        ):
            return "clip-benchmark"
        top = [f for f in p.iterdir() if f.is_file()]
        if any(f.name.endswith(TAR_SUFFIXES) for f in top):
            return "shards"
        if any(is_image(f.name) for f in top):
            return "images"
        if subdirs and any(_folder_images(p)):
            return "imagefolder"
        raise ValueError(
            f"no images found in ImageFolder directory {spec} (want <class>/<image>, images, "
            "or .tar shards)"
        )
    else:
        raise ValueError(f"input '{spec}': not found")
    raise ValueError(
        f"input '{spec}': unknown kind (want a folder, .tar shards, .tsv/.csv, COCO .json or .txt)"
    )


@dataclass
class Source:
    """An opened input: its kind, the files it reads, and its records.

    ``items`` holds the records of every kind read up front (all but shard kinds), so they can
    be indexed; shard kinds stream theirs from ``shards`` in :meth:`records`.
    """

    spec: str
    kind: str
    name: str
    files: list[tuple[str, Path]]  # (name, path) of every file read, for the fingerprint
    shards: list[str] = field(default_factory=list)
    items: list[Record] | None = None
    classes: list[str] | None = None  # label i is classes[i]; None when unknown
    templates_file: Path | None = None  # CLIP_benchmark's zero-shot templates, when present
    stats: TarStats = field(default_factory=TarStats)  # damage found while opening

    @property
    def streamed(self) -> bool:
        """True for shard kinds (records come from :meth:`records`, not ``items``)."""
        return self.items is None

    def records(self, stats: TarStats | None = None) -> Iterator[Record]:
        """Every record in order.

        Args:
            stats: receives the damage: what was found while opening (an ImageFolder tar is
                scanned then) at once, and the shards met damaged while streaming.
        """
        if stats is not None:
            merge_stats(stats, self.stats)
        if self.items is not None:
            return iter(self.items)
        return shard_records(self.shards, stats)


def _folder_source(spec: str, root: Path, kind: str) -> Source:
    images = _folder_images(root)
    classes = (
        sorted({p.relative_to(root).parts[0] for p in images}) if kind == "imagefolder" else None
    )
    index = {c: i for i, c in enumerate(classes or [])}
    items, files = [], []
    for p in images:
        rel = p.relative_to(root)
        files.append((rel.as_posix(), p))
        txt, js = p.with_suffix(".txt"), p.with_suffix(".json")
        caps = tables.read_lines(txt, skip_blank=True) if txt.is_file() else []
        meta: dict[str, Any] = {}
        for side in (txt, js):
            if side.is_file():
                files.append((side.relative_to(root).as_posix(), side))
        if js.is_file():
            try:
                loaded = json.loads(js.read_text(encoding="utf-8"))
                meta = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                meta = {}
        label = index[rel.parts[0]] if classes is not None else None
        items.append(Record(rel.with_suffix("").as_posix(), str(p), caps, label, meta, str(p)))
    if not items:
        raise ValueError(f"no images found in ImageFolder directory {root} (want <class>/<image>)")
    return Source(spec, kind, root.name, sorted(files), items=items, classes=classes)


def _tar_folder_source(spec: str, path: Path) -> Source:
    stats = TarStats()
    if is_compressed(path):  # no offsets to read by: keep the bytes (one pass over the file)
        found = [
            (f"{s['__key__']}.{k}", v, path)
            for s in tar_samples([path], stats)
            for k, v in s.items()
            if not k.startswith("__")
        ]
    else:
        found = [(m.name, m, path) for m in scan_tar(path, stats)]
    members = sorted((n, img) for n, img, _ in found if "/" in n and is_image(n))
    if not members:
        raise ValueError(f"no images found in tar {path}")
    classes = sorted({n.split("/", 1)[0] for n, _ in members})
    index = {c: i for i, c in enumerate(classes)}
    items = [
        Record(n.rsplit(".", 1)[0], img, [], index[n.split("/", 1)[0]], {}, str(path))
        for n, img in sorted(members, key=lambda t: (t[0].split("/", 1)[0], t[0]))
    ]
    return Source(
        spec,
        "imagefolder-tar",
        path.stem,
        [(str(path), path)],
        items=items,
        classes=classes,
        stats=stats,
    )


def _benchmark_source(spec: str, root: Path, split: str) -> Source:
    shard_dir = root / split
    nfile = shard_dir / "nshards.txt"
    if nfile.is_file():
        n = int(nfile.read_text().strip())
        shards = [str(shard_dir / f"{i}.tar") for i in range(n)]
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise ValueError(f"shard not found: {missing[0]} ({nfile} says {n})")
    else:
        shards = expand_shards(str(shard_dir))
    cn, tpl = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
    classes = tables.read_lines(cn, skip_blank=True) if cn.is_file() else None
    side = [(f.name, f) for f in (cn, tpl) if f.is_file()]
    return Source(
        spec,
        "clip-benchmark",
        root.name,
        side + [(s, Path(s)) for s in shards],
        shards=shards,
        classes=classes,
        templates_file=tpl if tpl.is_file() else None,
    )


def _table_source(spec: str, path: Path, kind: str, images_dir: str | Path | None) -> Source:
    if kind == "text":
        rows: list[tables.Row] = [(None, [ln], {}) for ln in tables.read_lines(path)]
    elif kind == "coco":
        rows = tables.read_coco(path, images_dir)
    else:
        rows = tables.read_caption_table(path, images_dir)
    items = []
    for i, (img, caps, meta) in enumerate(rows):
        if img is None:
            key = str(i)
        else:
            rel = meta.get("filepath") or meta.get("file_name") or img
            key = Path(rel).with_suffix("").as_posix()
        items.append(Record(key, img, caps, None, meta, str(path)))
    return Source(spec, kind, path.stem, [(path.name, path)], items=items)


def open_source(
    spec: str,
    kind: str = "auto",
    *,
    split: str = "test",
    images_dir: str | Path | None = None,
) -> Source:
    """Detect (unless ``kind`` is given), expand and open an input.

    Args:
        spec: a path, brace spec, ``::``-joined specs or URL (see the module docstring).
        kind: one of :data:`KINDS`, or ``auto``.
        split: the sub-folder of a CLIP_benchmark layout.
        images_dir: where a caption table's or COCO file's image paths start.

    Returns:
        A :class:`Source`; damage met while opening (an ImageFolder tar) is in its ``stats``.

    Raises:
        ValueError: missing input, unknown kind, bad layout or no images (one line naming it).

    Example:
        >>> src = open_source("cifar10/test.tar")  # doctest: +SKIP
        >>> src.kind, src.classes[:2], next(src.records()).label  # doctest: +SKIP
        ('imagefolder-tar', ['airplane', 'automobile'], 0)
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"unknown input kind '{kind}'; valid: auto, {', '.join(KINDS)}")
    kind = detect_kind(spec) if kind == "auto" else kind
    p = Path(spec).expanduser()
    if kind == "shards":
        name = p.name if p.is_dir() else p.stem if p.is_file() else p.parent.name
        shards = expand_shards(spec)
        return Source(spec, kind, name, [(u, Path(u)) for u in shards], shards=shards)
    if kind == "clip-benchmark":
        return _benchmark_source(spec, p, split)
    if kind in ("imagefolder", "images"):
        if not p.is_dir():
            raise ValueError(f"input '{spec}': not a folder")
        return _folder_source(spec, p, kind)
    if not p.is_file():
        raise ValueError(f"input '{spec}': file not found")
    if kind == "imagefolder-tar":
        return _tar_folder_source(spec, p)
    return _table_source(spec, p, kind, images_dir)


def iter_records(spec: str, kind: str = "auto", stats: TarStats | None = None, **kw: Any):
    """Records of ``spec`` in order (:func:`open_source` then :meth:`Source.records`).

    ``stats`` receives the damage counts, both found while opening and while streaming.
    """
    return open_source(spec, kind, **kw).records(stats)


def merge_stats(into: TarStats, other: TarStats) -> None:
    """Add ``other``'s counts and problems to ``into``."""
    for k, v in other.as_dict().items():
        setattr(into, k, getattr(into, k) + v)
    into.problems += other.problems
    into.duplicate_members += other.duplicate_members


def damage_report(stats: TarStats, examples: int = 10) -> dict[str, Any]:
    """The damage fields every reader writes into its JSON, from one ``stats``.

    Returns:
        ``{"skipped_shards": damaged tars, "incomplete_samples": samples cut where a tar broke
        (never yielded), "skipped_shard_examples": the first ``examples`` problems as text}``.
    """
    return {
        "skipped_shards": stats.skipped_shards,
        "incomplete_samples": stats.partial_samples,
        "skipped_shard_examples": [str(p) for p in stats.problems[:examples]],
    }


def fingerprint(source: Source | str) -> dict[str, Any]:
    """What an input looked like: file count, bytes and a digest over the files it reads.

    The digest covers each file's name, size and modified time, and for the files that index
    a set (a caption table, COCO JSON, text file, class names) the sha256 of their first MiB,
    so adding, removing, renaming or editing a file changes it. The images a table or COCO
    file points to are not listed (a million stats); shards and folder images are.

    Returns:
        ``{"kind", "files", "bytes", "sha256"}``.
    """
    src = source if isinstance(source, Source) else open_source(source)
    h = hashlib.sha256()
    total = 0
    for name, path in src.files:
        if is_url(str(path)):
            h.update(f"{name}\n".encode())
            continue
        st = path.stat()
        total += st.st_size
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if path.suffix.lower() in (".tsv", ".csv", ".json", ".txt") and src.kind != "images":
            with path.open("rb") as f:
                h.update(hashlib.sha256(f.read(HASH_HEAD_BYTES)).digest())
    return {"kind": src.kind, "files": len(src.files), "bytes": total, "sha256": h.hexdigest()}


def read_tar_image(tar: str, key: str) -> bytes | None:
    """The image of sample ``key`` in a tar (shard or ImageFolder tar), or None.

    Plain tars are indexed once (header scan, cached while unchanged) and read by offset.
    """
    if not Path(tar).is_file():
        return None
    try:
        if not is_compressed(tar):
            members = member_index(tar)
            m = next((members[key + e] for e in IMAGE_EXTS if key + e in members), None)
            return read_member(m) if m is not None else None
    except ValueError:
        return None
    for s in tar_samples([tar]):
        if s["__key__"] == key:
            return next((s[k] for k in IMAGE_FIELDS if k in s), None)
    return None


__all__ = [
    "CAPTION_FIELDS",
    "IMAGE_EXTS",
    "KINDS",
    "Record",
    "Source",
    "TarMember",
    "TarProblem",
    "TarStats",
    "damage_report",
    "detect_kind",
    "expand_shards",
    "fingerprint",
    "image_bytes",
    "iter_records",
    "open_source",
    "read_tar_image",
    "sample_record",
    "shard_records",
]
