"""Inputs of ``clipkit embed``: shards, an image folder or a caption file, as ordered records.

Every source yields :class:`Record` s in a deterministic order; a record's ``id`` is its position
in that order, so ids stay stable when an embedding run resumes or an index grows.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.data.tar_samples import TarStats, tar_samples

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PATH_COLUMNS = ("filepath", "path", "image", "file", "filename")
CAPTION_COLUMNS = ("title", "caption", "text", "txt", "sentence")
SOURCE_KINDS = ("auto", "shards", "folder", "captions")


@dataclass
class Record:
    """One item to embed: an image (encoded bytes or a path) and/or a caption, plus metadata."""

    id: int
    key: str
    image: bytes | str | None = None
    caption: str | None = None
    path: str | None = None
    url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def detect_kind(spec: str) -> str:
    """``shards`` for .tar files/brace specs/folders of tars, ``captions`` for .tsv/.csv/.txt,
    ``folder`` for other folders.

    Raises:
        ValueError: the input does not exist or is of no known kind.
    """
    p = Path(spec).expanduser()
    if "{" in spec or p.suffix == ".tar":
        return "shards"
    if p.is_file() and p.suffix.lower() in (".tsv", ".csv", ".txt"):
        return "captions"
    if p.is_dir():
        return "shards" if any(p.glob("*.tar")) else "folder"
    raise ValueError(f"input '{spec}': not found, or not shards, a folder or a .tsv/.csv/.txt file")


def shard_urls(spec: str) -> list[str]:
    """Expand a shard spec (file, brace pattern, ``::``-joined specs or folder) into tar paths."""
    import braceexpand

    urls: list[str] = []
    for part in spec.split("::"):
        p = Path(part).expanduser()
        if p.is_dir():
            urls += sorted(str(u) for u in p.glob("*.tar"))
            continue
        for u in braceexpand.braceexpand(part):
            hits = sorted(glob.glob(str(Path(u).expanduser())))
            if not hits:
                raise ValueError(f"shard not found: {u}")
            urls += hits
    if not urls:
        raise ValueError(f"input '{spec}': no .tar shards")
    return urls


def _meta_value(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, dict | list) else v


def iter_shards(
    spec: str,
    caption_keys: tuple[str, ...] = ("txt", "text", "caption"),
    stats: TarStats | None = None,
) -> Iterator[Record]:
    """Records from webdataset tars, shard by shard in sorted order, samples in tar order.

    A truncated or corrupt shard is read up to the damage and counted in ``stats`` (see
    :func:`clipkit.data.tar_samples.tar_samples`); the records after it keep consecutive ids.
    """
    for i, s in enumerate(tar_samples(shard_urls(spec), stats)):
        img = next((s[k] for k in IMAGE_EXTS_KEYS if k in s), None)
        cap = next((s[k] for k in caption_keys if k in s), None)
        meta = {}
        if "json" in s:
            try:
                meta = {k: _meta_value(v) for k, v in json.loads(s["json"]).items()}
            except ValueError:
                meta = {}
        yield Record(
            id=i,
            key=str(s["__key__"]),
            image=img,
            caption=cap.decode("utf-8", "replace") if isinstance(cap, bytes) else cap,
            path=f"{s['__url__']}#{s['__key__']}",
            url=meta.pop("url", None) if isinstance(meta.get("url"), str) else None,
            meta=meta,
        )


IMAGE_EXTS_KEYS = tuple(e[1:] for e in IMAGE_EXTS)


def iter_folder(root: str) -> Iterator[Record]:
    """Images under ``root`` (recursive, sorted by relative path); ``x.txt``/``x.json`` beside
    ``x.jpg`` give its caption and metadata."""
    base = Path(root).expanduser()
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    for i, p in enumerate(files):
        rel = p.relative_to(base).with_suffix("").as_posix()
        txt, js = p.with_suffix(".txt"), p.with_suffix(".json")
        meta = {}
        if js.is_file():
            try:
                meta = {k: _meta_value(v) for k, v in json.loads(js.read_text()).items()}
            except ValueError:
                meta = {}
        cap = txt.read_text().strip() if txt.is_file() else None
        yield Record(i, rel, image=str(p), caption=cap, path=str(p.resolve()), meta=meta)


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    low = {h.lower(): h for h in header}
    return next((low[n] for n in names if n in low), None)


def iter_captions(path: str) -> Iterator[Record]:
    """Rows of a caption file.

    ``.txt``: one caption per line (text only). ``.tsv``/``.csv`` with a header: a caption column
    (title/caption/text/...) and optionally an image path column (filepath/path/image/...),
    relative to the file's folder. With an image column, rows are grouped per image: the record's
    caption is the image's first caption and ``captions`` (JSON list) holds them all.

    Raises:
        ValueError: no caption column in the header.
    """
    p = Path(path).expanduser()
    if p.suffix.lower() == ".txt":
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(ln.rstrip("\n") for ln in f):
                yield Record(i, str(i), caption=line)
        return
    with p.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
        header = list(rows.fieldnames or [])
        cap_col, path_col = _pick(header, CAPTION_COLUMNS), _pick(header, PATH_COLUMNS)
        if cap_col is None:
            raise ValueError(
                f"{p}: no caption column in header {header}; expected one of {CAPTION_COLUMNS}"
            )
        if path_col is None:
            for i, row in enumerate(rows):
                yield Record(i, str(i), caption=row[cap_col])
            return
        groups: dict[str, list[str]] = {}
        for row in rows:
            groups.setdefault(row[path_col], []).append(row[cap_col])
    for i, (rel, caps) in enumerate(groups.items()):
        img = (p.parent / rel).resolve()
        key = Path(rel).with_suffix("").as_posix()
        meta = {"captions": json.dumps(caps)}
        yield Record(i, key, image=str(img), caption=caps[0], path=str(img), meta=meta)


def iter_records(spec: str, kind: str = "auto", stats: TarStats | None = None) -> Iterator[Record]:
    """Records of ``spec`` read as ``kind`` (``auto`` detects it).

    ``stats`` counts the truncated/unreadable shards of a ``shards`` input.

    Raises:
        ValueError: unknown kind or unreadable input.
    """
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown input kind '{kind}'; valid: {', '.join(SOURCE_KINDS)}")
    kind = detect_kind(spec) if kind == "auto" else kind
    if kind == "shards":
        return iter_shards(spec, stats=stats)
    if kind == "folder":
        if not Path(spec).expanduser().is_dir():
            raise ValueError(f"input '{spec}': not a folder")
        return iter_folder(spec)
    if not Path(spec).expanduser().is_file():
        raise ValueError(f"input '{spec}': caption file not found")
    return iter_captions(spec)
