"""Input of ``build_shards``: any input of :mod:`clipkit.data.sources`, as records with images.

ImageFolder folders and tars, caption TSV/CSV (column rule in :mod:`clipkit.data.tables`), COCO
captions JSON, image folders with side captions, and WebDataset shards (to re-shard) are detected
and read by the input layer; this module only checks that the records have images and gives an
ImageFolder image its class name as caption.
"""

from __future__ import annotations

from pathlib import Path

from clipkit.data.sources import Record, open_source
from clipkit.data.tables import PATH_COLUMNS
from clipkit.data.tar_samples import TarStats


def _caption_for_class(name: str) -> str:
    return name.replace("_", " ")


def read_input(
    path: Path, image_root: Path | None = None, stats: TarStats | None = None
) -> tuple[list[Record], list[str], str]:
    """Read every record of ``path`` (order: the input layer's).

    Args:
        path: any input the layer detects (see :mod:`clipkit.data.sources`).
        image_root: where a caption table's or COCO file's image paths start.
        stats: receives the damaged tars and incomplete samples (the layer's damage policy).

    Returns:
        ``(records, class names (empty when unlabelled), kind)``; a labelled record without
        captions gets its class name (``_`` as spaces) as its one caption.

    Raises:
        ValueError: missing, unknown or malformed input, or an input without images.
    """
    if not Path(path).expanduser().exists():
        raise ValueError(f"input not found: {path}")
    src = open_source(str(path), images_dir=image_root)
    records = list(src.records(stats if stats is not None else TarStats()))
    if any(r.image is None for r in records[:1]):
        raise ValueError(f"{path}: no image path column (one of {PATH_COLUMNS}), so no images")
    classes = src.classes or []
    for r in records:
        if not r.captions and r.label is not None and r.label < len(classes):
            r.captions = [_caption_for_class(classes[r.label])]
    return records, classes, src.kind
