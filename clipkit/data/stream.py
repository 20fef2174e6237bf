"""The worker side: raw tar samples -> deterministic shuffle -> skip -> decode -> batches.

Each DataLoader worker plays one *logical reader* of the epoch's :class:`~clipkit.data.shards.Plan`.
Its raw sample stream (shards in plan order, then a seeded shuffle buffer over undecoded bytes)
is a pure function of ``(seed, epoch, rank, reader)``, and each sample's crop and caption are
drawn from a random source seeded by its position in that stream. So resuming at position ``p``
replays the raw stream up to ``p`` without decoding anything and continues with the very
samples, crops and captions an uninterrupted run would have produced. After a resume on another
layout (:mod:`clipkit.data.elastic`) a worker plays *pieces* of the epoch's original streams
instead, each with that stream's seeds.
"""

from __future__ import annotations

import itertools
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from clipkit.data.decode import (
    DecodeError,
    crop_params,
    device_crop_plan,
    eval_crop,
    train_crop,
)
from clipkit.data.device_decode import pack
from clipkit.data.elastic import Piece, Stream
from clipkit.data.records import image_bytes
from clipkit.data.shards import Plan, is_url, part_range, split_part, tar_end_ok
from clipkit.data.views import ViewSpec, all_views

log = logging.getLogger(__name__)

STAT_KEYS = (
    "corrupt_image",
    "missing_image",
    "missing_caption",
    "bad_cls",
    "truncated_shard",
    "unreadable_shard",
    "tar_error",
)


@dataclass
class ReaderSpec:
    """Everything a worker needs; plain data so it forks/pickles cheaply."""

    plan: Plan
    resampled: bool
    seed: int
    epoch: int
    rank: int
    batch_size: int
    image_size: int
    train: bool
    tokenizer: Callable[[list[str]], torch.Tensor] | None
    image_keys: list[str]
    caption_keys: list[str]
    shuffle_buffer: int
    scale: tuple[float, float] = (0.9, 1.0)
    fast_decode: bool = True
    # data.decode=device: JPEGs travel encoded with their crop box (clipkit.data.device_decode).
    device_decode: bool = False
    need_text: bool = True
    # Resume: raw position and batches already produced, per logical reader.
    start_pos: list[int] = field(default_factory=list)
    produced: list[int] = field(default_factory=list)
    # Physical worker p plays logical reader (p + rotation) % W.
    rotation: int = 0
    # Views for self-supervision: batches carry "views" (V, B, 3, S, S) instead of "image";
    # with need_text too (SLIP) they carry both, and the caption tokens.
    views: ViewSpec | None = None
    # Record inputs by spec (ImageFolder folders/tars, image folders): the plan's part urls
    # (clipkit.data.shards.part_url) index into these.
    records: dict[str, list[Any]] = field(default_factory=dict)
    # Elastic resume (clipkit.data.elastic): per logical reader of this rank, the pieces of the
    # epoch's streams it reads in order (None: reader r reads its plan's shards), the piece
    # it resumes in, and the streams by id.
    pieces: list[list[Piece]] | None = None
    piece_idx: list[int] = field(default_factory=list)
    streams: dict[int, Stream] = field(default_factory=dict)


class _Reader:
    """One logical reader's stream: by default reader ``reader`` of this rank's plan; with
    ``stream``, a stream of the epoch's first layout (its shards and seeds)."""

    def __init__(self, spec: ReaderSpec, reader: int, stream: Stream | None = None):
        self.s = spec
        self.r = reader
        if stream is None:
            self.rank, self.sr = spec.rank, reader
            self.urls, self.quota = spec.plan.urls[reader], spec.plan.quotas[reader]
        else:
            self.rank, self.sr, self.urls = stream.rank, stream.worker, stream.urls
            self.quota = None
        self.stats: Counter = Counter()
        self.padding = False  # in a padding pass: samples were already counted
        self.skipping = False  # replaying consumed samples: counted before the checkpoint
        self.good_in_pass = 0
        self._shard_errors: set[str] = set()  # error kinds already counted for this shard
        self._orders: dict[str, list[int]] = {}  # record input -> this epoch's record order
        self.piece = 0  # elastic resume: the piece the last batch ended in

    @property
    def counting(self) -> bool:
        return not (self.padding or self.skipping)

    # -- raw stream --------------------------------------------------------------------------
    def _handler(self, exn: BaseException) -> bool:
        msg = str(exn)
        if isinstance(exn, (tarfile.ReadError, EOFError)) or "unexpected end" in msg:
            kind = "truncated_shard"
        elif isinstance(exn, OSError):
            kind = "unreadable_shard"
        else:
            kind = "tar_error"
        if kind in self._shard_errors:
            return True  # webdataset reports a broken stream once per member and once per shard
        self._shard_errors.add(kind)
        if self.counting:
            self.stats[kind] += 1
            log.warning("data: %s: %s", kind, msg[:300])
        return True

    def _part_samples(self, spec: str, part: int, parts: int) -> Iterator[dict[str, Any]]:
        """One part of a record input, as raw samples holding the image *reference* (a tar member
        or path), so replaying up to a resume position reads nothing."""
        records = self.s.records[spec]
        order = self._orders.get(spec)
        if order is None:
            order = list(range(len(records)))
            if self.s.train:
                # One permutation per (seed, epoch), the same on every rank and reader, cut
                # into contiguous parts: ImageFolder order is class-major, which a shuffle
                # buffer could not undo (batches of one class).
                random.Random(f"records/{self.s.seed}/{self.s.epoch}/{spec}").shuffle(order)
            self._orders[spec] = order
        for i in part_range(part, parts, len(records)):
            rec = records[order[i]]
            sample: dict[str, Any] = {"__key__": rec.key, "__image__": rec.image}
            if rec.captions:
                sample["txt"] = "\n".join(rec.captions)
            if rec.label is not None:
                sample["cls"] = rec.label
            yield sample

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        part = split_part(url)
        if part is not None and part[0] in self.s.records:
            yield from self._part_samples(*part)
            return
        self._shard_errors = set()
        yield from wds.tarfile_samples([{"url": url}], handler=self._handler)
        if not is_url(url) and not tar_end_ok(url):
            self._handler(tarfile.ReadError(f"{url}: no end-of-archive marker (truncated)"))

    def _resampled(self) -> Iterator[dict[str, Any]]:
        s, urls = self.s, self.urls
        rng = random.Random(f"resample/{s.seed}/{s.epoch}/{self.rank}/{self.sr}")
        weights = s.plan.weights[self.r]
        empty_run = 0
        while empty_run < 100:  # 100 shards in a row without a usable sample: give up
            self.good_in_pass = 0
            yield from self._shard_samples(rng.choices(urls, weights=weights)[0])
            empty_run = 0 if self.good_in_pass else empty_run + 1
        log.error("data: reader %d found no usable sample in 100 shards; stopping", self.r)

    def _pass(self, pass_: int) -> Iterator[dict[str, Any]]:
        order = list(self.urls)
        if pass_ > 0:
            s = self.s
            random.Random(f"pad/{s.seed}/{s.epoch}/{self.rank}/{self.sr}/{pass_}").shuffle(order)
        for url in order:
            yield from self._shard_samples(url)

    def _shuffled(self, src: Iterator[dict[str, Any]], tag: str) -> Iterator[dict[str, Any]]:
        n = self.s.shuffle_buffer if self.s.train else 0
        if n <= 1:
            yield from src
            return
        rng = random.Random(f"samples/{self.s.seed}/{self.s.epoch}/{self.rank}/{self.sr}/{tag}")
        buf: list[dict[str, Any]] = []
        for sample in src:
            if len(buf) < n:
                buf.append(sample)
                continue
            i = rng.randrange(n)
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf

    def raw(self) -> Iterator[dict[str, Any]]:
        """The deterministic raw (undecoded) sample stream of this reader."""
        if self.s.resampled:
            yield from self._shuffled(self._resampled(), "resampled")
            return
        for pass_ in range(1_000_000):
            if pass_ > 0:
                # Padding pass (train only): the quota outlived the shards because samples were
                # skipped. The previous pass is fully consumed here (buffer drained per pass).
                if not self.s.train or self.quota is None:
                    return
                if self.good_in_pass == 0:
                    return
                self.padding = True
            self.good_in_pass = 0
            yield from self._shuffled(self._pass(pass_), str(pass_))

    # -- decode --------------------------------------------------------------------------------
    def decode(self, sample: dict[str, Any], pos: int) -> dict[str, Any] | None:
        """Raw sample -> ``{"image", "text", "key"[, "cls"]}`` (+ ``"views"`` with views and
        captions: SLIP); None (counted) when unusable."""
        s = self.s
        if "__image__" in sample:  # a record input's reference, read now (after the skip)
            img_bytes = image_bytes(sample["__image__"])
        else:
            img_bytes = next((sample[k] for k in s.image_keys if k in sample), None)
        if img_bytes is None:
            self._count("missing_image")
            return None
        captions: list[str] = []
        cap = next((sample[k] for k in s.caption_keys if k in sample), None)
        if cap is not None:
            text = cap.decode("utf-8", errors="replace") if isinstance(cap, bytes) else str(cap)
            captions = [c.strip() for c in text.split("\n") if c.strip()]
        if s.need_text and not captions:
            self._count("missing_caption")
            return None
        if s.views is not None and not s.need_text:
            return self._decode_views(sample, img_bytes)
        rng = random.Random(f"{s.seed}/{s.epoch}/{self.rank}/{self.sr}/{pos}")
        views = plan = None
        try:
            if s.views is not None:
                # SLIP: the caption crop (its box from rng, as below) and the views, one decode
                # (a multi-crop spec's small crops are not SLIP's: dropped).
                (image,), views, _ = all_views(
                    img_bytes,
                    s.image_size,
                    s.views,
                    seed=s.seed,
                    epoch=s.epoch,
                    key=sample["__key__"],
                    fast=s.fast_decode,
                    crops=lambda h, w: [crop_params(rng, h, w, s.scale)],
                )
            elif s.train:
                plan = device_crop_plan(img_bytes, rng, s.scale) if s.device_decode else None
                if plan is None:
                    image = train_crop(img_bytes, s.image_size, rng, s.scale, s.fast_decode)
            else:
                image = eval_crop(img_bytes, s.image_size)
        except DecodeError as err:
            self._count("corrupt_image", f"{sample.get('__key__')}: {err}")
            return None
        if plan is not None:  # decoded on the device: the bytes and the box travel
            out = {"jpeg": img_bytes, "jpeg_box": (*plan[0], *plan[1]), "key": sample["__key__"]}
        else:
            out = {"image": image, "key": sample["__key__"]}
        if views is not None:
            out["views"] = views  # (V, 3, S, S)
        if captions:
            # Several captions per image (COCO): training draws one per step.
            out["text"] = captions[rng.randrange(len(captions))] if s.train else captions[0]
        self._label(sample, out)
        self.good_in_pass += 1
        return out

    def _decode_views(self, sample: dict[str, Any], img_bytes: bytes) -> dict[str, Any] | None:
        """``{"views": uint8 (V, 3, S, S), "key"[, "small_views", "cls"]}``; seeded by (seed,
        epoch, key, view),
        not by the stream position, so a sample's views do not depend on workers or ranks."""
        s, key = self.s, sample["__key__"]
        assert s.views is not None
        try:
            _, views, small = all_views(
                img_bytes,
                s.image_size,
                s.views,
                seed=s.seed,
                epoch=s.epoch,
                key=key,
                fast=s.fast_decode,
            )
        except DecodeError as err:
            self._count("corrupt_image", f"{key}: {err}")
            return None
        out: dict[str, Any] = {"views": views, "key": key}
        if small is not None:
            out["small_views"] = small  # (V_small, 3, s, s): SwAV's multi-crop
        self._label(sample, out)
        self.good_in_pass += 1
        return out

    def _label(self, sample: dict[str, Any], out: dict[str, Any]) -> None:
        if "cls" not in sample:
            return
        cls = sample["cls"]
        if isinstance(cls, int):  # record inputs carry the label itself
            out["cls"] = cls
            return
        try:
            out["cls"] = int(cls.decode().strip())
        except ValueError:
            self._count("bad_cls")

    def _count(self, kind: str, detail: str = "") -> None:
        if self.counting:
            self.stats[kind] += 1
            if detail:
                log.debug("data: %s: %s", kind, detail)

    # -- batches -------------------------------------------------------------------------------
    def collate(self, items: list[dict[str, Any]], pos: int, produced: int) -> dict[str, Any]:
        s = self.s
        batch: dict[str, Any] = {}
        if s.device_decode:  # encoded JPEGs + CPU-decoded rows (clipkit.data.device_decode)
            batch.update(pack(items, s.image_size))
        elif "image" in items[0]:
            batch["image"] = torch.stack([it["image"] for it in items])  # (B, 3, S, S) uint8
        if s.views is not None:
            batch["views"] = torch.stack([it["views"] for it in items], dim=1)  # (V, B, 3, S, S)
            if "small_views" in items[0]:  # (V_small, B, 3, s, s)
                batch["small_views"] = torch.stack([it["small_views"] for it in items], dim=1)
        batch["key"] = [it["key"] for it in items]
        if s.tokenizer is not None and all("text" in it for it in items):
            batch["text"] = s.tokenizer([it["text"] for it in items])  # (B, L)
        elif all("text" in it for it in items):
            batch["caption"] = [it["text"] for it in items]
        if items and all("cls" in it for it in items):
            batch["cls"] = torch.tensor([it["cls"] for it in items], dtype=torch.long)  # (B,)
        batch["_meta"] = self.meta(pos, produced)
        return batch

    def meta(self, pos: int, produced: int) -> dict[str, Any]:
        return {
            "reader": self.r,
            "pos": pos,
            "produced": produced,
            "piece": self.piece,
            "stats": dict(self.stats),
        }

    def batches(self) -> Iterator[dict[str, Any]]:
        s = self.s
        start = s.start_pos[self.r] if s.start_pos else 0
        produced = s.produced[self.r] if s.produced else 0
        quota = s.plan.quotas[self.r]
        if quota is not None and produced >= quota:
            return
        offset, step = s.plan.strides[self.r] if s.plan.strides else (0, 1)
        items: list[dict[str, Any]] = []
        pos = 0
        self.skipping = start > 0
        for pos, sample in enumerate(self.raw(), start=1):
            if pos <= start:
                # Consumed before the checkpoint: skipped undecoded. Reads after this one happened
                # after the checkpoint in the original run, so they count again.
                self.skipping = pos < start
                continue
            if (pos - 1) % step != offset:
                continue  # another reader's sample (eval on fewer shards than readers)
            item = self.decode(sample, pos - 1)
            if item is None:
                continue
            items.append(item)
            if len(items) == s.batch_size:
                produced += 1
                yield self.collate(items, pos, produced)
                items = []
                if quota is not None and produced >= quota:
                    return
        if items and quota is None:
            produced += 1
            yield self.collate(items, pos, produced)
        elif quota is not None:
            log.warning("data: reader %d ended %d batches short", self.r, quota - produced)
        # Final stats-only item so skips after the last batch are reported too.
        yield {"_meta": self.meta(max(pos, start), produced)}

    def piece_batches(self) -> Iterator[dict[str, Any]]:
        """Elastic resume: this reader's pieces of the epoch's streams, read in order as one
        batch stream; a batch's ``pos`` is the raw position in its last sample's piece."""
        s = self.s
        assert s.pieces is not None and s.train
        pieces = s.pieces[self.r]
        k0 = s.piece_idx[self.r] if s.piece_idx else 0
        start = s.start_pos[self.r] if s.start_pos else 0
        produced = s.produced[self.r] if s.produced else 0
        quota = s.plan.quotas[self.r] or 0
        items: list[dict[str, Any]] = []
        pos, self.piece = start, k0
        for k in range(k0, len(pieces) if produced < quota else k0):
            g, begin, end = pieces[k]
            sub = _Reader(s, self.r, s.streams[g])  # the stream's shards and seeds
            sub.stats = self.stats  # one set of counters per worker
            skip_to = max(start if k == k0 else 0, begin)
            sub.skipping = skip_to > 0
            pos, self.piece = skip_to, k
            for pos, sample in enumerate(itertools.islice(sub.raw(), end), start=1):
                if pos <= skip_to:
                    sub.skipping = pos < skip_to  # as in batches(): replayed, counted before
                    continue
                item = sub.decode(sample, pos - 1)
                if item is None:
                    continue
                items.append(item)
                if len(items) == s.batch_size:
                    produced += 1
                    yield self.collate(items, pos, produced)
                    items = []
                    if produced >= quota:
                        break
            if produced >= quota:
                break
        if produced < quota:
            log.warning("data: reader %d ended %d batches short", self.r, quota - produced)
        yield {"_meta": self.meta(pos, produced)}


class ShardStream(IterableDataset):
    """IterableDataset over the batches of this rank; one logical reader per worker."""

    def __init__(self, spec: ReaderSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n = len(self.spec.plan.urls)
        if info is None:
            # In-process loading reads every logical reader in the DataLoader's round-robin order.
            readers = [_Reader(self.spec, (i + self.spec.rotation) % n) for i in range(n)]
            iters = [_batches(r) for r in readers]
            while iters:
                for it in list(iters):
                    try:
                        yield next(it)
                    except StopIteration:
                        iters.remove(it)
            return
        torch.set_num_threads(1)  # workers decode one sample at a time; no intra-op pools
        yield from _batches(_Reader(self.spec, (info.id + self.spec.rotation) % n))


def _batches(reader: _Reader) -> Iterator[dict[str, Any]]:
    return reader.piece_batches() if reader.s.pieces is not None else reader.batches()
