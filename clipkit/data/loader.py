"""ShardLoader: the rank-side iterable the trainer and evaluators consume.

Batches are ``{"image": uint8 (B, 3, S, S), "text": long (B, L), "key": [str][, "cls": (B,)]}``,
or with views (self-supervision) ``{"views": uint8 (V, B, 3, S, S), "key": [str][, "cls": (B,)]}``,
or with views and a tokenizer (SLIP) both: ``{"image", "text", "views", "key"[, "cls"]}``;
``loader.normalize(images)`` turns images into normalised floats on whatever device they are
(uint8 batches are 4x cheaper to move between processes; see ANCHORS.md). Position in the
epoch's deterministic sample order is tracked per reader, so :meth:`ShardLoader.state_dict`
restarts exactly where a run stopped.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from clipkit.data.decode import normalize
from clipkit.data.shards import Plan, Source, parse_spec, plan_epoch, plan_resampled
from clipkit.data.stream import STAT_KEYS, ReaderSpec, ShardStream
from clipkit.data.views import ViewSpec

log = logging.getLogger(__name__)

STATE_VERSION = 1


class ShardLoader:
    """Iterable of batches for one rank; see the module docstring for the batch layout.

    Attributes:
        num_batches: batches per epoch on this rank (None in eval mode without sizes.json).
        stats: skip counters of the current epoch (corrupt images, missing captions, ...).
        classes: class names of an ImageFolder input (label i is ``classes[i]``), else None.
    """

    def __init__(
        self,
        sources: list[Source],
        spec: ReaderSpec,
        *,
        workers: int,
        world_size: int,
        num_samples: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        self.sources = sources
        self.spec = spec
        self.workers = workers
        self.world_size = world_size
        self.num_samples = num_samples
        self.mean = torch.tensor(mean, dtype=torch.float32)  # (3,)
        self.std = torch.tensor(std, dtype=torch.float32)  # (3,)
        self.classes = next((s.classes for s in sources if s.classes is not None), None)
        self._epoch = -1
        self.set_epoch(spec.epoch)

    # -- epoch & plan ----------------------------------------------------------------------
    def _plan(self, epoch: int) -> Plan:
        s = self.spec
        if s.resampled:
            return plan_resampled(
                self.sources,
                world_size=self.world_size,
                workers=self.workers,
                batch_size=s.batch_size,
                num_samples=self.num_samples,
            )
        return plan_epoch(
            self.sources,
            epoch=epoch,
            seed=s.seed,
            rank=s.rank,
            world_size=self.world_size,
            workers=self.workers,
            batch_size=s.batch_size,
            train=s.train,
            num_samples=self.num_samples,
        )

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` (a no-op when it is the current one, e.g. right after resume)."""
        if epoch == self._epoch:
            return
        self._epoch = epoch
        self.plan = self._plan(epoch)
        self.num_batches = self.plan.num_batches
        W = len(self.plan.urls)
        self._pos = [0] * W
        self._produced = [0] * W
        self._next_reader = 0
        self._batches = 0
        self._done = False
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._worker_stats: dict[int, dict[str, int]] = {}

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("length unknown: no sizes.json for these shards")
        return self.num_batches

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._done:
            # An epoch read to its end here and iterated again starts over, like a DataLoader
            # (call set_epoch(e + 1) between epochs). A restored finished epoch yields nothing.
            e, self._epoch = self._epoch, -1
            self.set_epoch(e)
        spec = replace(
            self.spec,
            plan=self.plan,
            epoch=self._epoch,
            start_pos=list(self._pos),
            produced=list(self._produced),
            rotation=self._next_reader,
        )
        base = dict(self.stats)
        self._worker_stats = {}
        # HF fast tokenizers deadlock in forked workers once their thread pool has started.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        dl = DataLoader(
            ShardStream(spec),
            batch_size=None,
            num_workers=self.workers,
            persistent_workers=False,
            prefetch_factor=4 if self.workers > 0 else None,
            # Page-locked batches let the trainer's non_blocking copy overlap the GPU's work.
            pin_memory=torch.cuda.is_available(),
        )
        W = len(self.plan.urls)
        for item in dl:
            meta = item.pop("_meta")
            r = meta["reader"]
            self._worker_stats[r] = meta["stats"]
            total = Counter(base)
            for st in self._worker_stats.values():
                total.update(st)
            self.stats = {k: total.get(k, 0) for k in (*STAT_KEYS, *total)}
            if "key" not in item:
                continue  # stats-only end-of-stream marker
            self._pos[r] = meta["pos"]
            self._produced[r] = meta["produced"]
            self._next_reader = (r + 1) % W
            self._batches += 1
            yield item
        self._done = True
        skipped = {k: v for k, v in self.stats.items() if v}
        if skipped:
            log.warning("data: epoch %d skips: %s", self._epoch, skipped)

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch: resuming yields exactly the batches not yet yielded."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batches": self._batches,
            "positions": list(self._pos),
            "produced": list(self._produced),
            "next_reader": self._next_reader,
            "stats": dict(self.stats),
            "readers": len(self.plan.urls),
            "world_size": self.world_size,
            "batch_size": self.spec.batch_size,
            "seed": self.spec.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the loader must be built with the same layout.

        Raises:
            ValueError: when workers, world size, batch size or seed differ from the saved run.
        """
        for key, mine in (
            ("readers", max(self.workers, 1)),
            ("world_size", self.world_size),
            ("batch_size", self.spec.batch_size),
            ("seed", self.spec.seed),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"data state: saved {key}={state.get(key)} but this run has {key}={mine}; "
                    "exact resume needs the same data layout"
                )
        self._epoch = -1
        self.set_epoch(int(state["epoch"]))
        self._batches = int(state["batches"])
        self._pos = [int(p) for p in state["positions"]]
        self._produced = [int(p) for p in state["produced"]]
        self._next_reader = int(state["next_reader"])
        self.stats = {k: int(v) for k, v in state["stats"].items()}

    # -- device side ---------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 ``(..., 3, S, S)`` (images or views) -> ``((x / 255) - mean) / std`` as ``dtype``,
        on its device."""
        return normalize(images, self.mean, self.std, dtype)


def _check_common(image_size: int, batch_size: int, workers: int) -> None:
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if workers < 0:
        raise ValueError(f"data.workers must be >= 0, got {workers}")


def build_train_loader(
    cfg: Any,
    *,
    tokenizer: Callable[[list[str]], torch.Tensor] | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    fast_decode: bool = True,
    scale: tuple[float, float] = (0.9, 1.0),
    views: ViewSpec | None = None,
) -> ShardLoader:
    """The training reader over ``cfg.train`` (shards, or ImageFolder folders/tars and image
    folders through the input layer).

    Args:
        cfg: :class:`clipkit.config.DataConfig` (``train``, ``weights``, ``num_samples``,
            ``resampled``, ``workers``, ``shuffle_buffer``, ``caption_keys``, ``image_keys``).
        tokenizer: ``list[str] -> LongTensor (B, L)``, run in the workers. With ``views``
            too, batches carry the caption crop and tokens AND the views (SLIP; see below).
        image_size: output side ``S``.
        mean, std: per-channel normalisation used by :meth:`ShardLoader.normalize`.
        batch_size: per-rank batch size ``B``.
        seed: base of every random choice (shard order, shuffle, crops, captions).
        rank, world_size: this process among the data-parallel ranks.
        train: True: RandomResizedCrop, shuffling, drop_last with equal steps on all ranks.
            False: eval crop, file order, every sample once, partial last batch.
        fast_decode: DCT-scaled JPEG decoding (False: full-size PIL decode like open_clip).
        scale: RandomResizedCrop area range (caption training; views carry their own).
        views: V augmented views per image (:func:`clipkit.data.views.view_spec`). Without a
            tokenizer batches are ``{"views": uint8 (V, B, 3, S, S), "key", ["cls"]}`` (plus
            ``"small_views"`` uint8 ``(V_small, B, 3, s, s)`` with a multi-crop spec) and
            captions are not needed (image-only shards and ImageFolder inputs are valid). With
            a tokenizer (SLIP) they are ``{"image", "text", "views", "key", ["cls"]}``: the
            caption training batch (same samples, crop boxes and captions as without views)
            plus the views, all crops of one decode per image. Each view is seeded by (seed,
            epoch, sample key, view index).

    Returns:
        A :class:`ShardLoader`; batches hold uint8 images, call ``loader.normalize`` on device.

    Raises:
        ValueError: bad spec/weights, missing shards, fewer shards than readers in epoch mode,
            unknown epoch size, too few samples for one batch per rank, views with
            ``train=False``, caption training on an input without captions.

    Example:
        >>> loader = build_train_loader(cfg.data, tokenizer=tok, image_size=224,
        ...     mean=OPENAI_MEAN, std=OPENAI_STD, batch_size=256, seed=0)
        >>> for batch in loader: x = loader.normalize(batch["image"].cuda())
    """
    _check_common(image_size, batch_size, cfg.workers)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if cfg.weights and not cfg.resampled:
        raise ValueError(
            "data.weights needs data.resampled=true (epoch mode reads every source once)"
        )
    if views is not None and not train:
        raise ValueError(
            "views are a training augmentation; build_train_loader(train=False) has none"
        )
    sources = parse_spec(cfg.train, cfg.weights)
    need_text = views is None or tokenizer is not None  # views + tokenizer: SLIP's batches
    if need_text:
        for src in sources:
            if src.records is not None and not any(r.captions for r in src.records):
                raise ValueError(
                    f"data.train: '{src.spec}' has images without captions; caption training "
                    "needs captions (image-only inputs are read with views, for self-supervision)"
                )
    plan = Plan([[]], [None])
    spec = ReaderSpec(
        plan=plan,
        resampled=bool(cfg.resampled) and train,
        seed=seed,
        epoch=0,
        rank=rank,
        batch_size=batch_size,
        image_size=image_size,
        train=train,
        tokenizer=tokenizer,
        image_keys=list(cfg.image_keys),
        caption_keys=list(cfg.caption_keys),
        shuffle_buffer=int(cfg.shuffle_buffer),
        scale=tuple(scale),
        fast_decode=fast_decode,
        need_text=need_text,
        views=views,
        records={s.spec: s.records for s in sources if s.records is not None},
    )
    return ShardLoader(
        sources,
        spec,
        workers=cfg.workers,
        world_size=world_size,
        num_samples=int(cfg.num_samples),
        mean=mean,
        std=std,
    )


class _Normalized:
    """Wraps a ShardLoader so that batches carry normalised float images."""

    def __init__(self, loader: ShardLoader):
        self.loader = loader
        self.num_batches = loader.num_batches

    @property
    def stats(self) -> dict[str, int]:
        return self.loader.stats

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            batch["image"] = self.loader.normalize(batch["image"])
            yield batch


def build_eval_loader(
    spec: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    *,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
    caption_keys: Sequence[str] = ("txt", "text", "caption"),
) -> Any:
    """Deterministic reader of WebDataset shards for evaluation.

    Every sample is read once, in shard and file order (split by rank, then worker, when those
    are > 1); images get open_clip's eval transform (resize shortest side, bicubic, center
    crop), normalised. Samples need an image; captions are optional.

    Args:
        spec: shard spec (brace expansion, ``::`` sources).
        image_size: output side ``S``; mean, std: normalisation.
        batch_size: batch size (last batch partial).
        tokenizer: when given, batches carry ``"text"`` (B, L); otherwise ``"caption"`` strings.
        workers, rank, world_size: parallel readers (shards must be >= readers only if > 1).

    Returns:
        Iterable of ``{"image": float (B, 3, S, S), "key": [...], ["cls": (B,)], ["text"]}``
        with ``.stats`` and ``.num_batches``.

    Raises:
        ValueError: empty spec or missing shards.
    """
    _check_common(image_size, batch_size, workers)
    sources = parse_spec(spec)
    rspec = ReaderSpec(
        plan=Plan([[]], [None]),
        resampled=False,
        seed=0,
        epoch=0,
        rank=rank,
        batch_size=batch_size,
        image_size=image_size,
        train=False,
        tokenizer=tokenizer,
        image_keys=list(image_keys),
        caption_keys=list(caption_keys),
        shuffle_buffer=0,
        need_text=False,
        records={s.spec: s.records for s in sources if s.records is not None},
    )
    loader = ShardLoader(
        sources, rspec, workers=workers, world_size=world_size, num_samples=0, mean=mean, std=std
    )
    return _Normalized(loader)
