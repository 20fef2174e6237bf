"""Inputs of ``clipkit embed``: any input of :mod:`clipkit.data.sources`, as numbered records.

The input layer detects, expands and reads the input; this module numbers its records and
flattens them for the metadata table. A record's ``id`` is its position in the layer's fixed
order, so ids stay stable when an embedding run resumes or an index grows.

``clipkit embed --kind`` keeps its three names: ``shards`` (WebDataset shards, CLIP_benchmark
layouts, ImageFolder tars), ``folder`` (image folders, ImageFolder trees) and ``captions``
(caption TSV/CSV, COCO JSON, ``.txt`` one sentence per line).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.data import sources
from clipkit.data.sources import IMAGE_EXTS, TarMember, TarStats

SOURCE_KINDS = ("auto", "shards", "folder", "captions")
# The input layer's kinds, grouped under the three names of ``clipkit embed --kind``.
_EMBED_KIND = {
    "shards": "shards",
    "clip-benchmark": "shards",
    "imagefolder-tar": "shards",
    "imagefolder": "folder",
    "images": "folder",
    "captions": "captions",
    "coco": "captions",
    "text": "captions",
}

__all__ = ["IMAGE_EXTS", "SOURCE_KINDS", "Record", "detect_kind", "iter_records", "open_input"]


@dataclass
class Record:
    """One item to embed: an image (bytes, a path or a tar member) and/or a caption."""

    id: int
    key: str
    image: bytes | str | TarMember | None = None
    caption: str | None = None
    path: str | None = None  # a file path, or ``<tar>#<key>`` (what the service reads back)
    url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def detect_kind(spec: str) -> str:
    """``shards``, ``folder`` or ``captions`` (see the module docstring).

    Raises:
        ValueError: the input does not exist or is of no known kind.
    """
    return _EMBED_KIND[sources.detect_kind(spec)]


def open_input(spec: str, kind: str = "auto") -> tuple[sources.Source, str]:
    """Open ``spec`` through the input layer as ``kind``; returns ``(source, embed kind)``.

    Raises:
        ValueError: unknown kind, unreadable input, or an input that is not of ``kind``.
    """
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown input kind '{kind}'; valid: {', '.join(SOURCE_KINDS)}")
    if kind == "folder":
        layer_kind = "images"
    elif kind == "shards":
        layer_kind = "shards"
    else:
        layer_kind = sources.detect_kind(spec)
        if kind == "captions" and _EMBED_KIND[layer_kind] != "captions":
            raise ValueError(f"input '{spec}': not a caption file (.tsv/.csv/.txt or COCO .json)")
    src = sources.open_source(spec, layer_kind)
    return src, _EMBED_KIND[src.kind]


def _meta_value(v: Any) -> Any:
    # Parquet columns need flat values: nested JSON stays a JSON string.
    return json.dumps(v) if isinstance(v, dict | list) else v


def _record(i: int, r: sources.Record) -> Record:
    meta = {k: _meta_value(v) for k, v in r.meta.items()}
    url = meta.pop("url") if isinstance(meta.get("url"), str) else None
    if r.image is not None and r.captions:
        meta.setdefault("captions", json.dumps(r.captions))
    if isinstance(r.image, str):
        path = str(Path(r.image).resolve())
    else:
        path = f"{r.source}#{r.key}" if r.image is not None else None
    caption = r.captions[0] if r.captions else None
    return Record(i, r.key, r.image, caption, path, url, meta)


def iter_records(
    spec: str | sources.Source, kind: str = "auto", stats: TarStats | None = None
) -> Iterator[Record]:
    """Numbered records of ``spec`` (or of an opened source) read as ``kind``.

    ``stats`` counts the truncated/unreadable tars, found when opening or while streaming.

    Raises:
        ValueError: unknown kind or unreadable input.
    """
    src = spec if isinstance(spec, sources.Source) else open_input(spec, kind)[0]
    return (_record(i, r) for i, r in enumerate(src.records(stats)))
