"""Input formats of ``build_shards``: each becomes a list of :class:`Record` (one per sample).

- ImageFolder directory, or a tar of one (``./<class>/<file>``): label -> ``cls``, class name ->
  caption.
- Caption table (``.tsv``/``.csv``) with a ``filepath`` column and a ``caption`` or ``title``
  column; several rows per image become one sample with all its captions.
- COCO captions JSON (``images`` + ``annotations``): one sample per image with all captions.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Record:
    """One output sample before its image is read."""

    # Where the image is: a file path, or a member name of ``tar_path``.
    source: str
    captions: list[str]
    label: int | None = None
    classname: str | None = None
    extra: dict = field(default_factory=dict)
    # Image bytes, when already read (tar inputs are read sequentially by the parent).
    data: bytes | None = None


def _caption_for_class(name: str) -> str:
    return name.replace("_", " ")


def from_image_folder(root: Path) -> tuple[list[Record], list[str]]:
    """``root/<class>/<image>`` -> records (sorted classes, sorted files) and class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-directories (expected an ImageFolder tree)")
    records = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                records.append(Record(str(f), [_caption_for_class(name)], label, name))
    return records, classes


def iter_tar_folder(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """Stream ``(class, member name, bytes)`` out of a tar of an ImageFolder tree."""
    with tarfile.open(path, mode="r|*") as tf:
        for m in tf:
            if not m.isreg():
                continue
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            if len(parts) < 2 or Path(parts[-1]).suffix.lower() not in IMAGE_EXTS:
                continue
            f = tf.extractfile(m)
            yield parts[0], m.name, f.read() if f is not None else b""


def from_tar_folder(path: Path) -> tuple[list[Record], list[str]]:
    """A tar of an ImageFolder tree -> records with bytes attached (read once, in order)."""
    items = sorted(iter_tar_folder(path), key=lambda t: (t[0], t[1]))
    classes = sorted({c for c, _, _ in items})
    if not classes:
        raise ValueError(f"{path}: no ./<class>/<image> members (expected a tar of an ImageFolder)")
    index = {c: i for i, c in enumerate(classes)}
    records = [
        Record(name, [_caption_for_class(c)], index[c], c, data=data) for c, name, data in items
    ]
    return records, classes


def from_caption_table(path: Path, image_root: Path | None = None) -> list[Record]:
    """TSV/CSV with ``filepath`` and ``caption``/``title`` columns; rows grouped per image."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    root = image_root or path.parent
    grouped: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        cols = reader.fieldnames or []
        if "filepath" not in cols:
            raise ValueError(f"{path}: no 'filepath' column (columns: {cols})")
        cap_col = next((c for c in ("caption", "title") if c in cols), None)
        if cap_col is None:
            raise ValueError(f"{path}: no 'caption' or 'title' column (columns: {cols})")
        for row in reader:
            fp, cap = (row.get("filepath") or "").strip(), (row.get(cap_col) or "").strip()
            if not fp:
                continue
            grouped.setdefault(fp, [])
            if cap:
                grouped[fp].append(cap)
    return [
        Record(str(Path(fp) if Path(fp).is_absolute() else root / fp), caps, extra={"filepath": fp})
        for fp, caps in grouped.items()
    ]


def _coco_image_root(path: Path) -> Path:
    """COCO layout: ``annotations/captions_train2017.json`` -> ``../train2017``."""
    split = path.stem.split("_")[-1]
    for cand in (path.parent.parent / split, path.parent / split, path.parent.parent, path.parent):
        if cand.is_dir() and any(cand.glob("*.jpg")):
            return cand
    raise ValueError(f"{path}: cannot find the images folder ({split}/); pass --images DIR")


def from_coco(path: Path, image_root: Path | None = None) -> list[Record]:
    """COCO captions JSON -> one record per image carrying all its captions."""
    try:
        data = json.loads(path.read_text())
        images, anns = data["images"], data["annotations"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a COCO captions JSON ({err})") from err
    root = image_root or _coco_image_root(path)
    caps: dict[int, list[str]] = {}
    for a in anns:
        caps.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
    return [
        Record(
            str(root / im["file_name"]),
            caps.get(im["id"], []),
            extra={"image_id": im["id"], "file_name": im["file_name"]},
        )
        for im in images
    ]


def read_input(path: Path, image_root: Path | None = None) -> tuple[list[Record], list[str], str]:
    """Dispatch on the input's kind.

    Returns:
        ``(records, class names (empty when unlabelled), kind)``.

    Raises:
        ValueError: unknown or malformed input.
    """
    if path.is_dir():
        recs, classes = from_image_folder(path)
        return recs, classes, "imagefolder"
    if not path.is_file():
        raise ValueError(f"input not found: {path}")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if suffix in (".tar", ".tar.gz", ".tgz"):
        recs, classes = from_tar_folder(path)
        return recs, classes, "imagefolder-tar"
    if suffix in (".tsv", ".csv"):
        return from_caption_table(path, image_root), [], "captions"
    if suffix == ".json":
        return from_coco(path, image_root), [], "coco"
    raise ValueError(
        f"{path}: unknown input kind '{suffix}' (ImageFolder dir, .tar, .tsv/.csv or COCO .json)"
    )
