"""Caption tables (TSV/CSV) and COCO captions JSON: the one column rule and the one grouping.

Column rule (every reader of clipkit uses it: evaluation, ``clipkit embed``, ``data_tools``):
header names are matched case-insensitively, the first name present in each tuple wins:

* image path: ``filepath``, ``image``, ``image_path``, ``path``, ``file``, ``filename``;
* caption: ``title``, ``caption``, ``text``, ``txt``, ``sentence``.

``filepath``/``title`` come first because they are open_clip's CSV defaults (``--csv-img-key
filepath --csv-caption-key title``), so a table made for open_clip reads the same column here.
Rows are grouped per image in first-seen order, captions in row order, stripped; empty captions
are dropped (the image stays). Relative image paths are relative to ``images_dir`` when given,
else to the table's folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

PATH_COLUMNS = ("filepath", "image", "image_path", "path", "file", "filename")
CAPTION_COLUMNS = ("title", "caption", "text", "txt", "sentence")

# (image path or None, captions, metadata) per image (or per row, for a table without images).
Row = tuple[str | None, list[str], dict[str, Any]]


def pick_column(header: list[str], names: tuple[str, ...]) -> int | None:
    """Index of the first of ``names`` found in ``header`` (case-insensitive), or None."""
    low = [h.strip().lower() for h in header]
    return next((low.index(n) for n in names if n in low), None)


def _resolve(rel: str, root: Path) -> str:
    p = Path(rel).expanduser()
    return str(p if p.is_absolute() else root / p)


def read_caption_table(path: Path, images_dir: str | Path | None = None) -> list[Row]:
    """Read a ``.tsv`` (tab) or ``.csv`` (comma) caption table with a header row.

    Args:
        path: the table.
        images_dir: where relative image paths start (default: the table's folder).

    Returns:
        With an image path column: one row per image, ``(image path, captions,
        {"filepath": as written})``. Without one: one row per table row, ``(None, [caption],
        {})`` (a text-only set; positions stay row numbers).

    Raises:
        ValueError: empty file, no caption column, or a row with too few fields (naming the
            line).
    """
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=sep))
    if not rows:
        raise ValueError(f"caption file {path} is empty")
    header = rows[0]
    img_col, cap_col = pick_column(header, PATH_COLUMNS), pick_column(header, CAPTION_COLUMNS)
    if cap_col is None:
        raise ValueError(
            f"caption file {path}: header {header} needs a caption column, one of "
            f"{CAPTION_COLUMNS} (and for images a path column, one of {PATH_COLUMNS})"
        )
    need = max(cap_col, img_col if img_col is not None else 0)
    for i, row in enumerate(rows[1:], start=2):
        if row and len(row) <= need:
            raise ValueError(f"caption file {path} line {i}: expected {len(header)} columns")
    body = [r for r in rows[1:] if r]
    if img_col is None:
        return [(None, [r[cap_col].strip()], {}) for r in body]
    root = Path(images_dir).expanduser() if images_dir else path.parent
    grouped: dict[str, list[str]] = {}
    for row in body:
        rel, cap = row[img_col].strip(), row[cap_col].strip()
        if not rel:
            continue
        caps = grouped.setdefault(rel, [])
        if cap:
            caps.append(cap)
    return [(_resolve(rel, root), caps, {"filepath": rel}) for rel, caps in grouped.items()]


def has_image_column(path: Path) -> bool:
    """True when the table's header names an image path column."""
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f, delimiter=sep), [])
    return pick_column(header, PATH_COLUMNS) is not None


def read_coco(path: Path, images_dir: str | Path | None = None) -> list[Row]:
    """Read a COCO captions JSON: one row per image, sorted by image id.

    Sorted by id as torchvision's ``CocoCaptions`` (and so CLIP_benchmark) orders it. Without
    ``images_dir`` the images are looked for where the COCO download puts them
    (``annotations/captions_val2017.json`` -> ``val2017/``), then beside the JSON.

    Returns:
        ``(image path, captions, {"image_id", "file_name"})``; an image without annotations
        has no captions.

    Raises:
        ValueError: not a COCO captions JSON, or the first image is in none of the folders.
    """
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"COCO captions file {path}: not readable JSON ({err})") from None
    images = _coco_list(d, "images", ("id", "file_name"), path)
    anns = _coco_list(d, "annotations", ("image_id", "caption"), path)
    if not images:
        raise ValueError(f"COCO captions file {path}: 'images' is empty")
    caps: dict[int, list[str]] = {}
    for a in anns:
        caps.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
    try:
        images = sorted(images, key=lambda im: im["id"])
    except TypeError:
        raise ValueError(f"COCO captions file {path}: image ids of mixed types") from None
    if images_dir:
        roots = [Path(images_dir).expanduser()]
    else:
        split = path.stem.split("_")[-1]
        roots = [path.parent.parent / split, path.parent / split, path.parent, path.parent.parent]
    first = images[0]["file_name"] if images else ""
    root = next((r for r in roots if (r / first).is_file()), None)
    if root is None:
        where = ", ".join(str(r) for r in roots)
        raise ValueError(f"COCO captions file {path}: image {first} not found in {where}")
    return [
        (
            str(root / im["file_name"]),
            [c for c in caps.get(im["id"], []) if c],
            {"image_id": im["id"], "file_name": im["file_name"]},
        )
        for im in images
    ]


def _coco_list(d: Any, key: str, fields: tuple[str, ...], path: Path) -> list[dict[str, Any]]:
    """``d[key]``, checked to be a list of objects that all have ``fields`` (one line naming the
    file, the key and the first entry that breaks the schema)."""
    if not isinstance(d, dict):
        raise ValueError(
            f"COCO captions file {path}: want an object with 'images' and 'annotations', "
            f"found a JSON {type(d).__name__}"
        )
    if key not in d:
        raise ValueError(f"COCO captions file {path}: missing key '{key}'")
    items = d[key]
    if not isinstance(items, list):
        raise ValueError(
            f"COCO captions file {path}: '{key}' must be a list, found {type(items).__name__}"
        )
    for i, item in enumerate(items):
        missing = [f for f in fields if f not in item] if isinstance(item, dict) else list(fields)
        if missing:
            raise ValueError(f"COCO captions file {path}: {key}[{i}] has no '{missing[0]}' key")
    return items


def read_lines(path: Path, *, skip_blank: bool = False) -> list[str]:
    """Lines of a UTF-8 text file without their newline (blank ones kept unless told)."""
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\r\n") for ln in f]
    return [ln.strip() for ln in lines if ln.strip()] if skip_blank else lines
