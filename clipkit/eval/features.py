"""Image features of a labelled set: what the kNN and linear-probe evaluators classify.

:func:`extract_features` runs ``model.encode_image`` over a labelled set (any layout
:func:`clipkit.eval.datasets.open_labelled` reads), L2-normalises each row and returns every
rank's rows gathered, in data order, on every rank (ranks read disjoint slices, as zero-shot does).
The model is anything with ``encode_image(images (B, 3, H, W)) -> (B, D)`` and a
``preprocess_eval`` transform: a :class:`~clipkit.models.DualEncoder` (its image tower) or an
SSL model (:class:`clipkit.models.ssl.SSLModel`: backbone features, before the projection head).

With ``cache_dir``, features are stored as ``<key>.npz``; the key hashes the model's weights,
the data's :func:`~clipkit.data.sources.fingerprint` (files, sizes, mtimes), the split of a
CLIP_benchmark layout, the eval transform and the precision, so a changed model, set or
transform never reads stale rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipkit.eval.gather import gather_rows

# Bump when the stored arrays change meaning, so old caches are never read as new ones.
CACHE_VERSION = 1


@dataclass
class Features:
    """L2-normalised image features of a labelled set, all ranks' rows in data order."""

    feats: torch.Tensor  # (N, D) float32, unit rows, on the CPU
    labels: torch.Tensor  # (N,) int64
    skipped: int = 0  # unreadable or incomplete samples (all ranks)
    skipped_shards: int = 0  # truncated or unreadable shards (all ranks)
    skipped_keys: list[str] = field(default_factory=list)  # this rank's examples
    skipped_shard_keys: list[str] = field(default_factory=list)
    cached: bool = False  # read from the cache

    def __len__(self) -> int:
        return int(self.feats.shape[0])


def weights_digest(model: Any) -> str:
    """sha256 over a model's parameter and buffer names, dtypes, shapes and bytes.

    Also covers the model's class and its ``cache_tag`` attribute (if any), so two feature
    points of the same weights (e.g. before and after a projection head) get different keys.
    """
    h = hashlib.sha256(f"{type(model).__qualname__}\0{getattr(model, 'cache_tag', '')}".encode())
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # A byte view works for every dtype (numpy has no bfloat16).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model: Any, data: str, *, split: str = "test", precision: str = "fp32") -> str:
    """The cache file's stem for ``model``'s features of ``data`` (see the module docstring)."""
    from clipkit.data.sources import fingerprint, open_source

    src = open_source(data, split=split)
    parts = {
        "version": CACHE_VERSION,
        "weights": weights_digest(model),
        "data": fingerprint(src),
        "split": split if src.kind == "clip-benchmark" else "",  # other layouts ignore it
        "transform": repr(model.preprocess_eval),
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def _read_cache(path: Path) -> Features | None:
    try:
        with np.load(path) as z:
            feats, labels = torch.from_numpy(z["feats"]), torch.from_numpy(z["labels"])
            skipped, shards = (int(v) for v in z["skipped"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # foreign: recompute
        return None
    return Features(feats, labels, skipped, shards, cached=True)


def _write_cache(path: Path, f: Features) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(
        buf, feats=f.feats.numpy(), labels=f.labels.numpy(),
        skipped=np.array([f.skipped, f.skipped_shards]),
    )  # fmt: skip
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)  # atomic: a reader sees the old file or the whole new one


def _all_ranks(accelerator: Any, flag: bool) -> bool:
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    t = torch.tensor([int(flag)], device=accelerator.device)
    return int(accelerator.reduce(t, "sum").item()) == accelerator.num_processes


@torch.no_grad()
def extract_features(
    model: Any,
    data: str | Any,
    *,
    split: str = "test",
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    accelerator: Any = None,
    progress: bool = False,
    cache_dir: str | Path = "",
    desc: str = "features",
) -> Features:
    """L2-normalised image features and labels of a labelled set, gathered over ranks.

    Args:
        model: has ``encode_image(images (B, 3, H, W)) -> (B, D)`` and ``preprocess_eval``.
        data: a labelled-set spec (:func:`~clipkit.eval.datasets.open_labelled`) or an opened
            :class:`~clipkit.eval.datasets.LabelledSet` (then never cached: no spec to key on).
        split: the split folder of a CLIP_benchmark layout.
        batch_size: images per forward pass.
        workers: DataLoader worker processes.
        device: where to run; default the accelerator's, else the model's.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast around ``encode_image``).
        accelerator: with one, each rank embeds its slice and every rank gets all rows.
        progress: show a progress bar.
        cache_dir: folder of cached features; empty: no cache.
        desc: the progress bar's label.

    Returns:
        :class:`Features` with ``feats (N, D)`` float32 unit rows and ``labels (N,)``, on the
        CPU, identical on every rank.

    Raises:
        ValueError: unreadable data, a sample without a label, or no images at all.

    Example:
        >>> f = extract_features(model, "cifar10/test.tar", cache_dir="~/.cache/clipkit/features")
        >>> f.feats.shape, f.labels.shape  # doctest: +SKIP
        (torch.Size([10000, 512]), torch.Size([10000]))
    """
    from clipkit.eval.datasets import labelled_loader, open_labelled
    from clipkit.eval.driver import autocast

    if device is None:
        device = accelerator.device if accelerator is not None else _model_device(model)
    device = torch.device(device)
    path = None
    if cache_dir and isinstance(data, str):
        key = cache_key(model, data, split=split, precision=precision)
        path = Path(cache_dir).expanduser() / f"{key}.npz"
        hit = _read_cache(path) if path.is_file() else None
        # Every rank must take the same branch, or the gathers below would hang.
        if _all_ranks(accelerator, hit is not None):
            return hit  # type: ignore[return-value]
    ls = data if not isinstance(data, str) else open_labelled(data, model.preprocess_eval, split)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    loader = labelled_loader(
        ls, batch_size=batch_size, workers=workers, rank=rank, world_size=world
    )
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()  # BatchNorm backbones (SSL) must use their running statistics
    feats, labels = [], []
    out = Features(torch.empty(0), torch.empty(0))
    total = len(loader) if hasattr(loader.dataset, "__len__") else None
    for batch in tqdm(loader, desc=desc, total=total, disable=not progress, unit="batch"):
        out.skipped += int(batch.get("skipped", 0))
        out.skipped_shards += int(batch.get("skipped_shards", 0))
        out.skipped_keys += batch.get("skipped_keys", [])
        out.skipped_shard_keys += batch.get("skipped_shard_keys", [])
        if batch["image"].shape[0] == 0:
            continue
        with autocast(device, precision):
            z = model.encode_image(batch["image"].to(device))  # (B, D)
        feats.append(F.normalize(z.float(), dim=-1))  # normalised in float32, after autocast
        labels.append(batch["cls"].to(device).long())  # (B,)
    if hasattr(model, "train"):
        model.train(was_training)
    dim = _feature_dim(feats, accelerator)
    f_t = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    l_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if accelerator is not None:
        (f_t, l_t), _ = gather_rows(accelerator, f_t, l_t)
        counts = torch.tensor([out.skipped, out.skipped_shards], device=accelerator.device)
        out.skipped, out.skipped_shards = (int(c) for c in accelerator.reduce(counts, "sum"))
    if f_t.shape[0] == 0:
        name = data if isinstance(data, str) else getattr(data, "name", "the data")
        raise ValueError(f"no readable images in {name}")
    out.feats, out.labels = f_t.cpu(), l_t.cpu()
    if path is not None and rank == 0:
        _write_cache(path, out)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # no rank reads a cache that rank 0 is still writing
    return out


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _feature_dim(feats: list[torch.Tensor], acc: Any) -> int:
    """D, also on a rank that read no images (it still joins the gathers with ``(0, D)``)."""
    d = feats[0].shape[1] if feats else 0
    if acc is not None and acc.num_processes > 1:
        d = int(acc.reduce(torch.tensor([d], device=acc.device), "max").item())
    return d


__all__ = ["CACHE_VERSION", "Features", "cache_key", "extract_features", "weights_digest"]
