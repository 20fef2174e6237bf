"""Records: what every input of :mod:`clipkit.data.sources` is read as, and how a grouped
WebDataset sample becomes one."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from clipkit.data.tar_samples import TarProblem, TarStats, tar_samples
from clipkit.data.tarscan import TarMember, read_member

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_FIELDS = tuple(e[1:] for e in IMAGE_EXTS)  # webdataset field names of an image
CAPTION_FIELDS = ("txt", "text", "caption")


@dataclass
class Record:
    """One item of an input, before its image is decoded."""

    key: str  # webdataset-style: the path without its extension (the row number for text)
    image: bytes | str | TarMember | None = None  # encoded bytes, a file path, or a tar member
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it was read from (shard, tar, table, image)

    @property
    def ref(self) -> str:
        """Where the record is, for messages: a path, ``tar:member`` or ``shard:key``."""
        if isinstance(self.image, str):
            return self.image
        if isinstance(self.image, TarMember):
            return f"{self.image.tar}:{self.image.name}"
        return f"{self.source}:{self.key}"


def image_bytes(image: bytes | str | TarMember | None) -> bytes:
    """The encoded image of a record (b"" when it cannot be read; the decoder counts it)."""
    if isinstance(image, TarMember):
        return read_member(image)
    if isinstance(image, str):
        try:
            with open(image, "rb") as f:
                return f.read()
        except OSError:
            return b""
    return image or b""


def is_image(name: str) -> bool:
    """True for a file name with an image extension."""
    return name.lower().endswith(IMAGE_EXTS)


def sample_record(sample: dict[str, Any]) -> Record:
    """A :class:`Record` from one grouped WebDataset sample (``tar_samples``' dicts).

    Raises:
        ValueError: a ``cls`` field that is not an integer (naming the sample).
    """
    key, url = str(sample["__key__"]), str(sample["__url__"])
    image = next((sample[k] for k in IMAGE_FIELDS if k in sample), None)
    cap = next((sample[k] for k in CAPTION_FIELDS if k in sample), None)
    captions = []
    if cap is not None:
        text = cap.decode("utf-8", "replace") if isinstance(cap, bytes) else str(cap)
        captions = [c.strip() for c in text.splitlines() if c.strip()]
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode().strip())
        except ValueError:
            bad = sample["cls"][:20]
            raise ValueError(f"sample {url}:{key}: 'cls' is not an integer: {bad!r}") from None
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            loaded = json.loads(sample["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            meta = {}
    fields = sorted(k for k in sample if not k.startswith("__"))
    return Record(key, image, captions, label, meta, url) if fields else Record(key, source=url)


def shard_records(
    urls: list[str],
    stats: TarStats | None = None,
    on_problem: Callable[[TarProblem], None] | None = None,
) -> Iterator[Record]:
    """Records of WebDataset shards, shard by shard, samples in tar order (damage counted)."""
    for sample in tar_samples(urls, stats, on_problem):
        yield sample_record(sample)
