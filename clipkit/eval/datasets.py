"""Evaluation data: torch datasets and loaders over the one input layer's records.

Every layout is detected and read by :mod:`clipkit.data.sources` (ImageFolder folder or tar,
WebDataset shards, CLIP_benchmark's layout, caption TSV/CSV, COCO JSON); this module only turns
records into ``(image tensor, target, key)`` items and batches:

* labelled sets (zero-shot): the target is the record's label; ``classes`` come from the folder
  names or ``classnames.txt`` (None for bare shards);
* caption sets (retrieval): the target is the record's captions (images without one are left
  out, as CLIP_benchmark's COCO loader does).

Sets known up front (folders, ImageFolder tars, tables) are map-style datasets sliced per rank;
shards stream, split over ranks and workers by shard. An unreadable image is dropped from its
batch and counted in ``"skipped"`` (named in ``"skipped_keys"``); a damaged tar is counted in
``"skipped_shards"`` (described in ``"skipped_shard_keys"``), so the evaluators report both.
Images are decoded like the training data (:func:`clipkit.data.decode.open_pil`: EXIF applied).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info

from clipkit.data.decode import DecodeError, open_pil
from clipkit.data.sources import Record, image_bytes, open_source, shard_records
from clipkit.data.tar_samples import TarProblem, TarStats


def decode_image(data: bytes) -> Image.Image | None:
    """RGB PIL image from encoded bytes (EXIF-rotated), or None when they are not an image."""
    if not data:
        return None
    try:
        return open_pil(data)  # decodes fully, so a truncated image shows up here
    except DecodeError:
        return None


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


def _label(rec: Record) -> int:
    if rec.label is None:
        raise ValueError(f"sample {rec.ref} has no 'cls' label")
    return rec.label


def _captions(rec: Record) -> list[str]:
    if not rec.captions:
        raise ValueError(f"sample {rec.ref} has no 'txt' captions")
    return rec.captions


def _item(rec: Record, target: Any, transform: Any) -> tuple[Any, Any, str]:
    img = decode_image(image_bytes(rec.image))
    return (None if img is None else transform(img)), target, rec.ref


class RecordList(Dataset):
    """Map-style dataset over records; the damage found when the set was opened (a cut
    ImageFolder tar) comes first, as :class:`TarProblem` items that :func:`collate` counts."""

    def __init__(
        self, records: list[Record], labelled: bool, transform: Any, problems: list | None = None
    ) -> None:
        self.records = records
        self.labelled = labelled
        self.transform = transform
        self.problems = list(problems or [])

    def __len__(self) -> int:
        return len(self.problems) + len(self.records)

    def __getitem__(self, i: int) -> Any:
        if i < len(self.problems):
            return self.problems[i]
        rec = self.records[i - len(self.problems)]
        return _item(rec, _label(rec) if self.labelled else rec.captions, self.transform)


class ShardStream(IterableDataset):
    """Shards split over ranks and workers (shard ``i`` to slot ``i % (world * workers)``)."""

    def __init__(self, shards: list[str], transform: Any, labelled: bool) -> None:
        self.shards = shards
        self.transform = transform
        self.labelled = labelled
        self.rank, self.world = 0, 1

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def _my_shards(self) -> list[str]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * nw + wid, self.world * nw
        return [s for i, s in enumerate(self.shards) if i % slots == slot]

    def __iter__(self):
        # Damaged shards come through as TarProblem items, in stream order, so the main process
        # (where collate runs) learns about them from any DataLoader worker.
        problems: list[TarProblem] = []
        for rec in shard_records(self._my_shards(), on_problem=problems.append):
            yield from problems
            problems.clear()
            yield _item(rec, _label(rec) if self.labelled else _captions(rec), self.transform)
        yield from problems


def LabelledShards(shards: list[str], transform: Any) -> ShardStream:  # noqa: N802 (old class)
    """WebDataset shards with an image and a ``cls`` label per sample."""
    return ShardStream(shards, transform, labelled=True)


def CaptionShards(shards: list[str], transform: Any) -> ShardStream:  # noqa: N802 (old class)
    """WebDataset shards with an image and ``txt`` captions (one per line)."""
    return ShardStream(shards, transform, labelled=False)


def collate(items: list[Any]) -> dict[str, Any]:
    """Stack readable samples; count (and name) the unreadable ones and the damaged shards.

    ``items`` are ``(image or None, target, key)`` tuples and :class:`TarProblem` s. An
    incomplete sample dropped where a shard broke counts as skipped, like an unreadable image.

    Returns:
        ``{"image" (B,3,H,W), "cls" (B,) or "captions" list[list[str]], "skipped",
        "skipped_keys", "skipped_shards", "skipped_shard_keys"}``.
    """
    problems = [it for it in items if isinstance(it, TarProblem)]
    items = [it for it in items if not isinstance(it, TarProblem)]
    good = [it for it in items if it[0] is not None]
    bad = [it[2] for it in items if it[0] is None]
    bad += [f"{p.url}:{p.dropped_key}" for p in problems if p.dropped_key]
    out: dict[str, Any] = {
        "skipped": len(bad),
        "skipped_keys": bad,
        "skipped_shards": len(problems),
        "skipped_shard_keys": [str(p) for p in problems],
    }
    out["image"] = torch.stack([it[0] for it in good]) if good else torch.empty(0, 3, 1, 1)
    if not items:
        # Only shard problems: the kind of set is unknown, and both evaluators skip empty batches.
        out["cls"] = torch.empty(0, dtype=torch.long)
        out["captions"] = []
    elif isinstance(items[0][1], list):
        out["captions"] = [it[1] for it in good]
    else:
        out["cls"] = torch.tensor([int(it[1]) for it in good], dtype=torch.long)  # (B,)
    return out


def _check_exists(spec: str, what: str, want: str) -> None:
    # A plain path that is not there gets the one line users know from the eval CLIs.
    if not any(c in spec for c in "{*?[:") and not Path(spec).expanduser().exists():
        raise ValueError(f"{what} data not found: {spec} (want {want})")


def open_labelled(spec: str, transform: Any, split: str = "test") -> LabelledSet:
    """Open a labelled image set (any layout :mod:`clipkit.data.sources` detects).

    Args:
        spec: folder, ``.tar`` file, brace spec of shards or CLIP_benchmark folder.
        transform: PIL image -> ``(3, H, W)`` tensor (the model's ``preprocess_eval``).
        split: sub-folder of a CLIP_benchmark layout.

    Returns:
        :class:`LabelledSet`.

    Raises:
        ValueError: nothing at ``spec``, an unlabelled kind, or no images (one line naming it).
    """
    _check_exists(spec, "labelled", "a folder, a .tar or shards")
    src = open_source(spec, split=split)
    if src.kind in ("captions", "coco", "text", "images"):
        raise ValueError(f"labelled data expected at {spec}, found a {src.kind} input")
    if src.streamed:
        ds: Any = LabelledShards(src.shards, transform)
    else:
        stats = TarStats()  # an ImageFolder tar's damage, found when it was opened
        ds = RecordList(list(src.records(stats)), True, transform, stats.problems)
    return LabelledSet(ds, src.name, src.classes, src.templates_file)


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
    """Batches ``{"image", "cls", "skipped", "skipped_keys", ...}`` of this rank's slice.

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


def open_captions(spec: str, transform: Any, images_dir: str | None = None) -> Any:
    """Open an image-caption set: TSV/CSV, COCO JSON, or shards with ``txt`` captions.

    Raises:
        ValueError: missing file, bad header or layout, or no images (one line naming the file).
    """
    _check_exists(spec, "caption", ".tsv/.csv, COCO .json or shards")
    src = open_source(spec, images_dir=images_dir)
    if src.streamed:
        return CaptionShards(src.shards, transform)
    if src.kind == "captions" and any(r.image is None for r in src.items[:1]):
        raise ValueError(f"caption file {spec}: no image path column, so no images to retrieve")
    stats = TarStats()
    items = [r for r in src.records(stats) if r.image is not None and r.captions]
    if not items:
        raise ValueError(f"no images with captions in {spec}")
    return RecordList(items, False, transform, stats.problems)


def caption_loader(
    spec: str | Any,
    transform: Any,
    *,
    batch_size: int = 256,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    images_dir: str | None = None,
) -> DataLoader:
    """Batches ``{"image", "captions", "skipped", "skipped_keys", ...}`` of this rank's slice.

    ``spec`` is a spec for :func:`open_captions` or a set it opened (``transform`` is set on it).
    """
    if isinstance(spec, str | Path):
        dataset = open_captions(str(spec), transform, images_dir)
    else:
        dataset = spec
        dataset.transform = transform
    return _loader(dataset, batch_size, workers, rank, world_size)


__all__ = [
    "LabelledSet",
    "caption_loader",
    "collate",
    "decode_image",
    "labelled_loader",
    "open_captions",
    "open_labelled",
]
