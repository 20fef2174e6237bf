"""ShardLoader: the rank-side iterable the trainer and evaluators consume.

Batches are ``{"image": uint8 (B, 3, S, S), "text": long (B, L), "key": [str][, "cls": (B,)]}``,
or with views (self-supervision) ``{"views": uint8 (V, B, 3, S, S), "key": [str][, "cls": (B,)]}``,
or with views and a tokenizer (SLIP) both: ``{"image", "text", "views", "key"[, "cls"]}``;
``loader.normalize(images)`` turns images into normalised floats on whatever device they are
(uint8 batches are 4x cheaper to move between processes; see ANCHORS.md). Position in the
epoch's deterministic sample order is tracked per reader, so :meth:`ShardLoader.state_dict`
restarts exactly where a run stopped; given every rank's states, :meth:`ShardLoader.load_state_dict`
continues the epoch on another number of ranks, workers or batch size
(:mod:`clipkit.data.elastic`).
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
from clipkit.data.device_decode import check_mode, device_for_decode, unpack
from clipkit.data.elastic import Piece, Stream, continue_epoch, epoch_streams, merged_stats
from clipkit.data.shards import Plan, Source, parse_spec, plan_epoch, plan_resampled
from clipkit.data.stream import STAT_KEYS, ReaderSpec, ShardStream
from clipkit.data.views import ViewSpec

log = logging.getLogger(__name__)

STATE_VERSION = 2


class ShardLoader:
    """Iterable of batches for one rank; see the module docstring for the batch layout.

    Attributes:
        num_batches: batches per epoch on this rank (None in eval mode without sizes.json).
        stats: skip counters of the current epoch (corrupt images, missing captions, ...).
        classes: class names of an ImageFolder input (label i is ``classes[i]``), else None.
        elastic: :meth:`load_state_dict` takes every rank's states and resumes on another
            number of ranks, workers or batch size.
    """

    elastic = True

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
        decode_device: torch.device | None = None,
    ):
        self.sources = sources
        self.spec = spec
        # data.decode=device: where the main process decodes the workers' JPEGs.
        self.decode_device = decode_device
        self._device_stats: Counter = Counter()
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
        # The epoch's streams are this layout's readers until an elastic resume hands them on.
        self._layout = (self.world_size, W)
        self._pieces: list[list[Piece]] | None = None
        self._piece_idx = [0] * W
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
            pieces=self._pieces,
            piece_idx=list(self._piece_idx),
            streams=self._streams() if self._pieces is not None else {},
        )
        base = dict(self.stats)
        self._worker_stats = {}
        self._device_stats = Counter()
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
            if self.spec.device_decode and "key" in item:
                unpack(item, self.spec.image_size, self.decode_device, self._device_stats)
            total.update(self._device_stats)
            self.stats = {k: total.get(k, 0) for k in (*STAT_KEYS, *total)}
            if "key" not in item:
                continue  # stats-only end-of-stream marker
            self._pos[r] = meta["pos"]
            self._produced[r] = meta["produced"]
            self._piece_idx[r] = meta["piece"]
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
            "resampled": self.spec.resampled,
            # What an elastic resume needs (clipkit.data.elastic): this rank, its readers'
            # quotas, the layout of the epoch's streams and the pieces read since a resume.
            "rank": self.spec.rank,
            "quotas": list(self.plan.quotas),
            "num_batches": self.num_batches,
            "layout": list(self._layout),
            "pieces": None if self._pieces is None else [list(map(list, r)) for r in self._pieces],
            "piece_idx": list(self._piece_idx),
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Restore a :meth:`state_dict`, or continue from every rank's states.

        Args:
            state: this rank's state saved on the same layout, or the list of every rank's
                states (rank order, as a checkpoint holds them) saved on any number of ranks,
                workers and batch size: the epoch continues where it stopped, every remaining
                sample read once (:mod:`clipkit.data.elastic`).

        Raises:
            ValueError: a different seed or mode (resampled); one rank's state of another
                layout; states too old to resume on another layout (one line each).
        """
        if isinstance(state, list):
            mine = state[self.spec.rank] if len(state) == self.world_size else None
            if mine is None or self._layout_change(mine):
                self._load_elastic(state)
                return
            state = mine
        change = self._layout_change(state)
        if change:
            raise ValueError(
                f"data state: saved {change}; exact resume on another layout needs every "
                "rank's state (the checkpoint's list)"
            )
        self._epoch = -1
        self.set_epoch(int(state["epoch"]))
        self._batches = int(state["batches"])
        self._pos = [int(p) for p in state["positions"]]
        self._produced = [int(p) for p in state["produced"]]
        self._next_reader = int(state["next_reader"])
        self.stats = {k: int(v) for k, v in state["stats"].items()}
        if state.get("pieces") is not None:  # an epoch already resumed on this layout
            self._layout = tuple(state["layout"])
            self._pieces = [[tuple(p) for p in r] for r in state["pieces"]]
            self._piece_idx = [int(k) for k in state["piece_idx"]]
            W = len(self._pieces)
            self.plan = Plan([[] for _ in range(W)], list(state["quotas"]))
            self.num_batches = self.plan.num_batches = int(state["num_batches"])

    def _layout_change(self, state: dict[str, Any]) -> str:
        """'' when ``state`` was saved on this layout, else what differs (``world_size=2 but
        this run has world_size=1``)."""
        self._check_same(state, "seed", self.spec.seed)
        self._check_same(state, "resampled", self.spec.resampled, default=False)
        for key, mine in (
            ("readers", max(self.workers, 1)),
            ("world_size", self.world_size),
            ("batch_size", self.spec.batch_size),
        ):
            if state.get(key) != mine:
                return f"{key}={state.get(key)} but this run has {key}={mine}"
        return ""

    @staticmethod
    def _check_same(state: dict[str, Any], key: str, mine: Any, default: Any = None) -> None:
        if state.get(key, default) != mine:
            raise ValueError(
                f"data state: saved {key}={state.get(key, default)} but this run has "
                f"{key}={mine}; resume needs the same data.{key} (or train.{key})"
            )

    def _load_elastic(self, states: list[dict[str, Any]]) -> None:
        """Continue the saved epoch on this layout (see :mod:`clipkit.data.elastic`)."""
        for st in states:
            self._check_same(st, "seed", self.spec.seed)
            self._check_same(st, "resampled", self.spec.resampled, default=False)
        first = states[0]
        if any("layout" not in st for st in states):
            raise ValueError(
                f"data state: saved by an older clipkit on {first.get('world_size')} ranks x "
                f"{first.get('readers')} readers; resume it on that layout"
            )
        if self.spec.resampled:
            raise ValueError(
                "data.resampled=true draws shards with replacement: resume on the saved number "
                f"of processes ({first['world_size']}) and data.workers ({first['readers']})"
            )
        self._epoch = -1
        self.set_epoch(int(first["epoch"]))
        K = len(self.plan.urls)
        self._layout = tuple(first["layout"])
        rank = self.spec.rank
        self._pieces, quotas, num_batches = continue_epoch(
            states, self._streams(), self.world_size, K, rank, self.spec.batch_size
        )
        counts = [sum(e - b for _, b, e in c) for c in self._pieces]
        self.plan = Plan([[] for _ in range(K)], quotas, num_batches=num_batches, counts=counts)
        self.num_batches = num_batches
        # The saved ranks' skip counters go on in rank 0, so their sum stays the epoch's.
        merged = merged_stats(states) if rank == 0 else {}
        self.stats = {k: merged.get(k, 0) for k in (*STAT_KEYS, *merged)}

    def _streams(self) -> dict[int, Stream]:
        """The current epoch's streams: the readers of the layout it started on."""
        key = (self._epoch, self._layout)
        if getattr(self, "_stream_key", None) != key:
            self._stream_cache = epoch_streams(
                self.sources, self._epoch, self.spec.seed, self._layout, self.num_samples
            )
            self._stream_key = key
        return self._stream_cache

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
    decode_device: str | torch.device | None = None,
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
        decode_device: with ``cfg.decode="device"``, where the batches' JPEGs are decoded
            (:mod:`clipkit.data.device_decode`); None: this process's CUDA device, and without
            one the workers decode (one warning line).

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
    mode = getattr(cfg, "decode", "workers")
    check_mode(mode)
    device = None
    if mode == "device":
        if views is not None or not train:
            raise ValueError(
                "data.decode=device applies to caption training; self-supervised views and "
                "evaluation are decoded by the workers (data.decode=workers)"
            )
        device = torch.device(decode_device) if decode_device is not None else device_for_decode()
        if device is None:
            log.warning("data.decode=device: no CUDA device in this process; the workers decode")
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
        device_decode=device is not None,
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
        decode_device=device,
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
