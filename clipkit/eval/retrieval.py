"""Image-text retrieval with several captions per image, in CLIP_benchmark's semantics.

* text -> image (``image_retrieval_recall@k``): one query per caption; a hit when its image is
  among the ``k`` images scoring highest with it.
* image -> text (``text_retrieval_recall@k``): one query per image; a hit when *any* of its
  captions is among the ``k`` captions scoring highest with it.

Both are computed from ranks: a query's rank is 1 + the number of candidates scoring strictly
higher than its (best) positive, so recall@k is ``mean(rank <= k)``; clipkit adds the mean and
median rank. Scores are computed in chunks of queries, so memory stays bounded by
``chunk_elems`` floats whatever the number of images and captions (e.g. 100k x 500k).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipkit.eval.gather import gather_rows, is_prepared_loader
from clipkit.eval.zeroshot import _device_of

DEFAULT_CHUNK_ELEMS = 1 << 25  # 32M scores = 128 MB of float32 per chunk


@torch.no_grad()
def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of the positives for both retrieval directions.

    Args:
        image_emb: ``(N, D)`` normalised image embeddings.
        text_emb: ``(M, D)`` normalised caption embeddings.
        text_to_image: ``(M,)`` index of each caption's image in ``image_emb``.
        chunk_elems: at most this many scores are held at once.
        progress: show a progress bar.

    Returns:
        ``(t2i_rank (M,), i2t_rank (N,))`` int64 on the embeddings' device: the rank of each
        caption's image, and of each image's best-ranked caption.

    Raises:
        ValueError: mismatched sizes, an index out of range, or an image without captions.
    """
    n, m = image_emb.shape[0], text_emb.shape[0]
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({m},)")
    t2i = text_to_image.to(image_emb.device).long()
    if m and (int(t2i.min()) < 0 or int(t2i.max()) >= n):
        raise ValueError(f"text_to_image holds an index outside [0, {n})")
    n_caps = torch.bincount(t2i, minlength=n)  # (N,)
    if n == 0 or m == 0 or bool((n_caps == 0).any()):
        raise ValueError("retrieval needs at least one image and one caption per image")
    image_emb, text_emb = image_emb.float(), text_emb.float()
    # Scores are always computed as text @ image.T, the orientation CLIP_benchmark uses, so both
    # directions see bit-identical scores.
    t2i_rank = torch.empty(m, dtype=torch.long, device=image_emb.device)
    step = max(1, chunk_elems // n)
    for s in tqdm(range(0, m, step), desc="text->image", disable=not progress, leave=False):
        scores = text_emb[s : s + step] @ image_emb.t()  # (c, N)
        pos = scores.gather(1, t2i[s : s + step, None])  # (c, 1)
        t2i_rank[s : s + step] = (scores > pos).sum(1) + 1
    # Captions grouped by image so each image chunk finds its captions by slicing.
    order = torch.argsort(t2i, stable=True)  # (M,)
    bounds = torch.cat([n_caps.new_zeros(1), n_caps.cumsum(0)])  # (N + 1,)
    i2t_rank = torch.empty(n, dtype=torch.long, device=image_emb.device)
    step = max(1, chunk_elems // m)
    for s in tqdm(range(0, n, step), desc="image->text", disable=not progress, leave=False):
        e = min(s + step, n)
        scores = (text_emb @ image_emb[s:e].t()).t()  # (c, M)
        caps = order[bounds[s] : bounds[e]]  # captions of images s..e-1
        rows = t2i[caps] - s  # (p,)
        best = torch.full((e - s,), -torch.inf, device=scores.device)
        best.scatter_reduce_(0, rows, scores[rows, caps], reduce="amax")  # (c,)
        i2t_rank[s:e] = (scores > best[:, None]).sum(1) + 1
    return t2i_rank, i2t_rank


def rank_metrics(
    t2i_rank: torch.Tensor | np.ndarray,
    i2t_rank: torch.Tensor | np.ndarray,
    recall_k: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k and mean/median rank from :func:`retrieval_ranks`.

    Returns:
        ``image_retrieval_recall@k`` / ``text_retrieval_recall@k`` for each ``k``, and
        ``{image,text}_retrieval_{mean,median}_rank``.
    """
    out: dict[str, float] = {}
    t2i = np.asarray(t2i_rank.cpu() if torch.is_tensor(t2i_rank) else t2i_rank)
    i2t = np.asarray(i2t_rank.cpu() if torch.is_tensor(i2t_rank) else i2t_rank)
    for k in recall_k:
        out[f"image_retrieval_recall@{k}"] = float((t2i <= k).mean())
        out[f"text_retrieval_recall@{k}"] = float((i2t <= k).mean())
    for name, r in (("image_retrieval", t2i), ("text_retrieval", i2t)):
        out[f"{name}_mean_rank"] = float(r.mean())
        out[f"{name}_median_rank"] = float(np.median(r))
    return out


def _unpack(batch: Any) -> tuple[torch.Tensor, list[list[str]], int]:
    if isinstance(batch, dict):
        return batch["image"], batch["captions"], int(batch.get("skipped", 0))
    return batch[0], batch[1], 0


def _embed_dim(model: Any) -> int:
    """Width of the embeddings, for a rank that has none of its own to gather."""
    dim = getattr(model, "embed_dim", None)
    if dim is None:
        raise ValueError("retrieval: no images on this rank and the model has no embed_dim")
    return int(dim)


@torch.no_grad()
def embed_pairs(
    model: Any,
    batches: Iterable[Any],
    *,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Embed images and their captions; gather every rank's share.

    Args:
        model: a DualEncoder.
        batches: iterable of ``(images (B,3,H,W), captions)`` where ``captions[b]`` is the list
            of captions of image ``b``, or dicts ``{"image", "captions"[, "skipped"]}``.
        accelerator: optional Accelerator; ranks hold disjoint slices (any length).
        device: where to run; defaults to the model's device.
        progress: show a progress bar.

    Returns:
        ``(image_emb (N, D), text_emb (M, D), text_to_image (M,), skipped)``.
    """
    dev = _device_of(model, device)
    was_training = model.training
    model.eval()
    imgs, txts, owner, skipped, n_img = [], [], [], 0, 0
    for batch in tqdm(batches, desc="retrieval", disable=not progress, unit="batch"):
        images, captions, n_skip = _unpack(batch)
        skipped += n_skip
        if images.shape[0] == 0:
            continue
        flat = [c for caps in captions for c in caps]
        idx = [n_img + b for b, caps in enumerate(captions) for _ in caps]
        imgs.append(F.normalize(model.encode_image(images.to(dev)).float(), dim=-1))  # (B, D)
        txts.append(F.normalize(model.encode_text(model.tokenize(flat).to(dev)).float(), dim=-1))
        owner.append(torch.tensor(idx, dtype=torch.long, device=dev))  # (b_txt,)
        n_img += images.shape[0]
    model.train(was_training)
    if imgs:
        image_emb, text_emb, t2i = torch.cat(imgs), torch.cat(txts), torch.cat(owner)
    else:
        # A rank may hold no data (fewer shards than ranks): it still joins the gathers below,
        # raising here would leave the others waiting in them.
        d = _embed_dim(model)
        image_emb = text_emb = torch.zeros(0, d, device=dev)
        t2i = torch.zeros(0, dtype=torch.long, device=dev)
    if accelerator is not None and accelerator.num_processes > 1:
        if is_prepared_loader(batches):
            raise ValueError(
                "retrieval: pass each rank's own slice (not an accelerate-prepared loader: its "
                "padding duplicates would count twice)"
            )
        (image_emb,), counts = gather_rows(accelerator, image_emb)
        (text_emb, t2i_g), n_txt = gather_rows(accelerator, text_emb, t2i)
        # Caption -> image indices were local to each rank: shift by the images before it.
        offsets = torch.tensor([0, *counts[:-1]], device=dev).cumsum(0)
        rank_of_text = torch.repeat_interleave(torch.arange(len(n_txt), device=dev),
                                               torch.tensor(n_txt, device=dev))  # fmt: skip
        t2i = t2i_g + offsets[rank_of_text]
        skipped = int(accelerator.reduce(torch.tensor(skipped, device=dev), "sum").item())
    if image_emb.shape[0] == 0:
        raise ValueError("retrieval evaluation: the data yielded no images")
    return image_emb, text_emb, t2i, skipped


def retrieval(
    model: Any,
    data: str | Path | Iterable[Any],
    *,
    batch_size: int = 256,
    workers: int = 0,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    recall_k: Sequence[int] = (1, 5, 10),
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: bool = False,
) -> dict[str, float]:
    """Image-text retrieval metrics of ``model``.

    Args:
        model: a DualEncoder.
        data: a caption set path (TSV/CSV ``filepath, caption``, COCO captions JSON, or
            WebDataset shards with ``txt``; read with the model's eval transform, split by rank)
            or an iterable of batches as in :func:`embed_pairs`.
        batch_size: images per batch when ``data`` is a path.
        workers: DataLoader workers when ``data`` is a path.
        accelerator: optional Accelerator; every rank embeds its slice, results are gathered
            and every rank returns the same metrics.
        device: where to run; defaults to the model's device.
        recall_k: the ``k`` of recall@k.
        chunk_elems: memory bound of the score chunks (floats).
        progress: show progress bars.

    Returns:
        ``{"image_retrieval_recall@k", "text_retrieval_recall@k", "*_mean_rank",
        "*_median_rank", "n_images", "n_captions"}`` (+ ``"skipped"`` when images were
        unreadable, ``"skipped_shards"`` when shards were truncated or unreadable).

    Raises:
        ValueError: unreadable data spec, no images, or an image without captions.
    """
    if isinstance(data, (str, Path)):
        from clipkit.eval.datasets import caption_loader

        rank = accelerator.process_index if accelerator is not None else 0
        world = accelerator.num_processes if accelerator is not None else 1
        data = caption_loader(
            str(data), model.preprocess_eval, batch_size=batch_size, workers=workers,
            rank=rank, world_size=world,
        )  # fmt: skip
    from clipkit.eval.driver import SkipLog

    # Count the damaged shards the batches report on the way through; a loader prepared by
    # Accelerate is passed as is, since embed_pairs must still recognise it.
    log = None if is_prepared_loader(data) else SkipLog(data)
    image_emb, text_emb, t2i, skipped = embed_pairs(
        model, data if log is None else log, accelerator=accelerator, device=device,
        progress=progress,
    )  # fmt: skip
    skipped_shards = len(log.shard_keys) if log is not None else 0
    if accelerator is not None and accelerator.num_processes > 1:
        dev = image_emb.device
        skipped_shards = int(
            accelerator.reduce(torch.tensor(skipped_shards, device=dev), "sum").item()
        )
    t2i_rank, i2t_rank = retrieval_ranks(
        image_emb, text_emb, t2i, chunk_elems=chunk_elems, progress=progress
    )
    out = rank_metrics(t2i_rank, i2t_rank, recall_k)
    out["n_images"] = float(image_emb.shape[0])
    out["n_captions"] = float(text_emb.shape[0])
    if skipped:
        out["skipped"] = float(skipped)
    if skipped_shards:
        out["skipped_shards"] = float(skipped_shards)
    return out
