"""Evaluation data readers: labelled images and image-caption sets, in a deterministic order.

Labelled sets (zero-shot classification):
  * an ImageFolder directory (``root/<class>/<image>``, classes sorted by name);
  * a tar of an ImageFolder tree (``./<class>/<image>`` members, read in place by offset);
  * WebDataset shards with ``cls`` labels (a ``.tar``, a brace spec ``a/{0..9}.tar`` or a folder
    of ``.tar`` files);
  * CLIP_benchmark's WebDataset layout: a folder with ``classnames.txt``,
    ``zeroshot_classification_templates.txt`` and ``<split>/{0..n-1}.tar``.

Caption sets (retrieval): a TSV/CSV with ``filepath`` and ``caption``/``title`` columns (one row
per caption, paths relative to the file), a COCO captions JSON, or shards with ``txt`` captions
(one per line, as CLIP_benchmark writes them).

Images are decoded with PIL and passed through the model's eval transform. An unreadable image
is dropped from its batch and counted in the batch's ``"skipped"`` (its name in
``"skipped_keys"``), so the evaluators can report it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset, Subset

from clipkit.eval.shards import (
    IMAGE_EXTS,
    CaptionShards,
    LabelledShards,
    collate,
    decode_image,
    expand_shards,
    scan_tar,
)


class LabelledSet:
    """A labelled evaluation set: the dataset plus what is known about its classes."""

    def __init__(
        self,
        dataset: Any,
        name: str,
        classes: list[str] | None = None,
        templates_file: Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.name = name
        self.classes = classes  # folder names (ImageFolder) or classnames.txt; None for shards
        self.templates_file = templates_file


class _ImageList(Dataset):
    """Map-style dataset over files or tar members, with labels (int) or captions (list)."""

    def __init__(self, sources: list[Any], targets: list[Any], transform: Any) -> None:
        self.sources = sources  # path str, or (tar path, offset, size, member name)
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[Any, Any, str]:
        src = self.sources[i]
        if isinstance(src, str):
            key = src
            try:
                with open(src, "rb") as f:
                    data = f.read()
            except OSError:
                data = b""
        else:
            key = f"{src[0]}:{src[3]}"
            data = _pread(src[0], src[1], src[2])
        img = decode_image(data)
        return (None if img is None else self.transform(img)), self.targets[i], key


_FDS: dict[tuple[int, str], int] = {}


def _pread(path: str, offset: int, size: int) -> bytes:
    # One descriptor per process (DataLoader workers fork); pread keeps no shared file position.
    fd = _FDS.get((os.getpid(), path))
    if fd is None:
        fd = _FDS[(os.getpid(), path)] = os.open(path, os.O_RDONLY)
    return os.pread(fd, size, offset)


def _image_folder(root: Path, transform: Any) -> LabelledSet:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    sources, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, files in os.walk(root / cls):
            dirnames.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTS):
                    sources.append(os.path.join(dirpath, f))
                    labels.append(label)
    if not sources:
        raise ValueError(f"no images found in ImageFolder directory {root} (want <class>/<image>)")
    return LabelledSet(_ImageList(sources, labels, transform), root.name, classes)


def _tar_image_folder(path: Path, members: list[tuple[str, int, int]], transform: Any):
    by_class: dict[str, list[tuple[str, int, int]]] = {}
    for name, off, size in members:
        parts = name.split("/")
        by_class.setdefault(parts[0], []).append((name, off, size))
    classes = sorted(by_class)
    sources, labels = [], []
    for label, cls in enumerate(classes):
        for name, off, size in sorted(by_class[cls]):
            sources.append((str(path), off, size, name))
            labels.append(label)
    return LabelledSet(_ImageList(sources, labels, transform), path.stem, classes)


def open_labelled(spec: str, transform: Any, split: str = "test") -> LabelledSet:
    """Open a labelled image set (see the module docstring for the accepted layouts).

    Args:
        spec: folder, ``.tar`` file or brace spec of shards.
        transform: PIL image -> ``(3, H, W)`` tensor (the model's ``preprocess_eval``).
        split: sub-folder of a CLIP_benchmark layout.

    Returns:
        :class:`LabelledSet`.

    Raises:
        ValueError: nothing at ``spec``, or no images in it (one line naming the path).
    """
    p = Path(spec).expanduser()
    if p.is_dir():
        if (p / "classnames.txt").is_file():  # CLIP_benchmark WebDataset layout
            shard_dir = p / split
            nfile = shard_dir / "nshards.txt"
            if nfile.is_file():
                n = int(nfile.read_text().strip())
                shards = [str(shard_dir / f"{i}.tar") for i in range(n)]
            else:
                shards = expand_shards(str(shard_dir))
            from clipkit.eval.prompts import load_classnames

            tpl = p / "zeroshot_classification_templates.txt"
            return LabelledSet(
                LabelledShards(shards, transform),
                p.name,
                load_classnames(str(p / "classnames.txt")),
                tpl if tpl.is_file() else None,
            )
        if any(p.glob("*.tar")) and not any(d.is_dir() for d in p.iterdir()):
            return LabelledSet(LabelledShards(expand_shards(str(p)), transform), p.name)
        return _image_folder(p, transform)
    if p.suffix == ".tar" and p.is_file():
        members = scan_tar(p)
        if not members:
            raise ValueError(f"no images found in tar {p}")
        if all("/" in name for name, _, _ in members):
            return _tar_image_folder(p, members, transform)
        return LabelledSet(LabelledShards([str(p)], transform), p.stem)
    if "{" in spec:
        return LabelledSet(LabelledShards(expand_shards(spec), transform), Path(spec).parent.name)
    raise ValueError(f"labelled data not found: {spec} (expected a folder, a .tar or shards)")


def _loader(dataset: Any, batch_size: int, workers: int, rank: int, world: int) -> DataLoader:
    if isinstance(dataset, Dataset) and hasattr(dataset, "__len__") and world > 1:
        n = len(dataset)
        dataset = Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    elif hasattr(dataset, "set_rank"):
        dataset.set_rank(rank, world)
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, shuffle=False
    )


def labelled_loader(
    data: str | LabelledSet,
    transform: Any = None,
    *,
    batch_size: int = 256,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Batches ``{"image", "cls", "skipped", "skipped_keys"}`` of this rank's slice.

    Args:
        data: a spec for :func:`open_labelled` or an opened :class:`LabelledSet`.
        transform: the eval transform (needed when ``data`` is a spec).
        batch_size: images per batch.
        workers: DataLoader worker processes.
        rank: this process's rank; ranks get disjoint contiguous slices (or shards).
        world_size: number of processes.
    """
    ls = data if isinstance(data, LabelledSet) else open_labelled(data, transform)
    return _loader(ls.dataset, batch_size, workers, rank, world_size)


_IMAGE_COLUMNS = ("filepath", "image", "file", "path")
_CAPTION_COLUMNS = ("caption", "title", "text", "txt")


def _captions_table(path: Path) -> list[tuple[str, list[str]]]:
    import csv

    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=sep))
    if not rows:
        raise ValueError(f"caption file {path} is empty")
    header = [h.strip().lower() for h in rows[0]]
    img_col = next((header.index(h) for h in _IMAGE_COLUMNS if h in header), None)
    cap_col = next((header.index(h) for h in _CAPTION_COLUMNS if h in header), None)
    if img_col is None or cap_col is None:
        raise ValueError(
            f"caption file {path}: header {rows[0]} needs a column named one of {_IMAGE_COLUMNS} "
            f"and one of {_CAPTION_COLUMNS}"
        )
    grouped: dict[str, list[str]] = {}
    for i, row in enumerate(rows[1:], start=2):
        if len(row) <= max(img_col, cap_col):
            raise ValueError(f"caption file {path} line {i}: expected {len(header)} columns")
        grouped.setdefault(row[img_col], []).append(row[cap_col])
    # Relative image paths are relative to the caption file (open_clip's CSV convention).
    return [(str(path.parent / k), v) for k, v in grouped.items()]


def _captions_coco(path: Path, images_dir: str | None) -> list[tuple[str, list[str]]]:
    import json

    d = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(d, dict) or "images" not in d or "annotations" not in d:
        raise ValueError(f"COCO captions file {path}: needs 'images' and 'annotations' lists")
    caps: dict[int, list[str]] = {}
    for a in d["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    images = sorted(d["images"], key=lambda im: im["id"])  # torchvision's CocoCaptions order
    if images_dir:
        roots = [Path(images_dir)]
    else:  # captions_train2017.json -> ../train2017, the COCO download layout
        split = path.stem.split("_")[-1]
        roots = [path.parent, path.parent.parent / split, path.parent / split, path.parent.parent]
    first = images[0]["file_name"] if images else ""
    root = next((r for r in roots if (r / first).is_file()), None)
    if root is None:
        where = ", ".join(str(r) for r in roots)
        raise ValueError(f"COCO captions file {path}: image {first} not found in {where}")
    return [(str(root / im["file_name"]), caps[im["id"]]) for im in images if im["id"] in caps]


def open_captions(spec: str, transform: Any, images_dir: str | None = None) -> Any:
    """Open an image-caption set: TSV/CSV, COCO JSON, or shards with ``txt`` captions.

    Raises:
        ValueError: missing file, bad header or layout, or no images (one line naming the file).
    """
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() in (".tsv", ".csv"):
        items = _captions_table(p)
    elif p.is_file() and p.suffix.lower() == ".json":
        items = _captions_coco(p, images_dir)
    elif p.is_dir() and (p / "test").is_dir():  # CLIP_benchmark retrieval layout
        return CaptionShards(expand_shards(str(p / "test")), transform)
    elif p.is_dir() or p.suffix == ".tar" or "{" in spec:
        return CaptionShards(expand_shards(spec), transform)
    else:
        raise ValueError(f"caption data not found: {spec} (want .tsv/.csv, COCO .json or shards)")
    if not items:
        raise ValueError(f"no images with captions in {p}")
    return _ImageList([s for s, _ in items], [c for _, c in items], transform)


def caption_loader(
    spec: str,
    transform: Any,
    *,
    batch_size: int = 256,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    images_dir: str | None = None,
) -> DataLoader:
    """Batches ``{"image", "captions", "skipped", "skipped_keys"}`` of this rank's slice."""
    dataset = open_captions(spec, transform, images_dir)
    return _loader(dataset, batch_size, workers, rank, world_size)


__all__ = [
    "LabelledSet",
    "caption_loader",
    "labelled_loader",
    "open_captions",
    "open_labelled",
]
