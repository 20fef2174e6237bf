r"""``clipkit eval retrieval``: image-text retrieval, result JSON in CLIP_benchmark's shape.

Example (CPU, COCO captions with 5 per image)::

    clipkit eval retrieval --model runs/coco/export \
        --data ../shared/data/coco_mini/captions.tsv --output coco.json --bootstrap 1000

``--data``: a TSV/CSV with ``filepath`` and ``caption``/``title`` columns (one row per caption,
paths relative to the file), a COCO captions JSON (images found next to it, in
``../<split>/`` or in ``--images``) or WebDataset shards with ``txt`` captions (one per line).

The same :data:`EVALUATOR` runs inside training (``eval.retrieval``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from clipkit.eval import driver


@dataclass
class RetrievalOptions:
    """Options of image-text retrieval (CLI flags of the same names)."""

    images: str = ""  # image folder of a COCO captions JSON (default: found next to it)
    recall_k: str = "1,5,10"  # comma-separated k of recall@k


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", default="", help="image folder of a COCO captions JSON")
    parser.add_argument(
        "--recall-k", default="1,5,10", help="comma-separated k of recall@k (default 1,5,10)"
    )


def parse_k(text: str) -> list[int]:
    """``"1,5,10"`` -> ``[1, 5, 10]``.

    Raises:
        ValueError: not comma-separated integers >= 1.
    """
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--recall-k must be comma-separated integers (got '{text}')") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--recall-k needs integers >= 1 (got '{text}')")
    return ks


def _prepare(data: str, options: RetrievalOptions) -> tuple[list[int], Any]:
    """The recall ks and the opened caption set, before the model loads: a bad ``--recall-k``
    or a caption file of the wrong schema is one line without a model load (issue 17)."""
    from clipkit.eval.datasets import open_captions

    ks = parse_k(options.recall_k)
    return ks, open_captions(data, None, options.images or None)


def run_retrieval(ctx: driver.EvalContext) -> driver.Outcome:
    """Retrieval over ``ctx.data`` (this rank's slice, gathered)."""
    from clipkit.eval.datasets import caption_loader
    from clipkit.eval.retrieval import embed_pairs, rank_metrics, retrieval_ranks

    opts: RetrievalOptions = ctx.options
    ks, data = ctx.prepared if ctx.prepared is not None else (parse_k(opts.recall_k), ctx.data)
    loader = caption_loader(
        data, ctx.model.preprocess_eval, batch_size=ctx.batch_size, workers=ctx.workers,
        rank=ctx.rank, world_size=ctx.world_size, images_dir=opts.images or None,
    )  # fmt: skip
    batches = ctx.watch(loader)
    with ctx.autocast():
        image_emb, text_emb, t2i, skipped = embed_pairs(
            ctx.model, batches, accelerator=ctx.accelerator, device=ctx.device,
            progress=ctx.progress,
        )  # fmt: skip
    # Outside autocast: the scores must be float32 whatever the encoders ran in.
    t2i_rank, i2t_rank = retrieval_ranks(image_emb, text_emb, t2i, progress=ctx.progress)
    (skipped_shards,) = ctx.sum_over_ranks(len(ctx.log.shard_keys))
    t_rank, i_rank = t2i_rank.cpu().numpy(), i2t_rank.cpu().numpy()

    # Each direction resamples its own queries: captions for text->image, images for
    # image->text (the other direction's ranks are a placeholder, its metrics dropped).
    def text_queries(i):
        m = rank_metrics(t_rank[i], i_rank[:1], ks)
        return {k: v for k, v in m.items() if k.startswith("image_")}

    def image_queries(i):
        m = rank_metrics(t_rank[:1], i_rank[i], ks)
        return {k: v for k, v in m.items() if k.startswith("text_")}

    metrics = rank_metrics(t2i_rank, i2t_rank, ks)
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "recall@" in k)
    return driver.Outcome(
        metrics=metrics,
        counts={"n_samples": int(image_emb.shape[0]), "n_captions": int(text_emb.shape[0])},
        skipped=skipped,
        skipped_shards=skipped_shards,
        resamples=[
            driver.Resample(len(t_rank), text_queries),
            driver.Resample(len(i_rank), image_queries),
        ],
        summary=f"{ctx.dataset}: {shown}",
    )


EVALUATOR = driver.Evaluator(
    name="retrieval",
    task="zeroshot_retrieval",
    options=RetrievalOptions,
    run=run_retrieval,
    add_options=_add_options,
    prepare=_prepare,
)
