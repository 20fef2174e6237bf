r"""``clipkit eval retrieval``: image-text retrieval, result JSON in CLIP_benchmark's shape.

Example (CPU, COCO captions with 5 per image)::

    clipkit eval retrieval --model runs/coco/export \
        --data ../shared/data/coco_mini/captions.tsv --output coco.json --bootstrap 1000

``--data``: a TSV/CSV with ``filepath`` and ``caption``/``title`` columns (one row per caption,
paths relative to the file), a COCO captions JSON (images found next to it, in
``../<split>/`` or in ``--images``) or WebDataset shards with ``txt`` captions (one per line).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from clipkit.eval.cli_common import (
    SkipLog,
    add_common_arguments,
    autocast,
    check_common,
    dataset_name,
    load_model,
    pick_device,
    result_payload,
    skip_report,
    write_json,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_common_arguments(parser)
    parser.add_argument("--images", default="", help="image folder of a COCO captions JSON")
    parser.add_argument(
        "--recall-k", default="1,5,10", help="comma-separated k of recall@k (default 1,5,10)"
    )


def _parse_k(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--recall-k must be comma-separated integers (got '{text}')") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--recall-k needs integers >= 1 (got '{text}')")
    return ks


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the JSON, print a one-line summary. Returns the exit status."""
    from clipkit.eval.bootstrap import bootstrap_ci
    from clipkit.eval.datasets import caption_loader
    from clipkit.eval.retrieval import embed_pairs, rank_metrics, retrieval_ranks

    check_common(args)
    ks = _parse_k(args.recall_k)
    device = pick_device(args.device)
    progress = not args.no_progress
    model = load_model(args.model, args.pretrained, args.seed).to(device).eval()
    loader = caption_loader(
        args.data,
        model.preprocess_eval,
        batch_size=args.batch_size,
        workers=args.workers,
        images_dir=args.images or None,
    )

    t0 = time.perf_counter()
    batches = SkipLog(loader)
    with autocast(device, args.precision):
        image_emb, text_emb, t2i, skipped = embed_pairs(model, batches, progress=progress)
    t2i_rank, i2t_rank = retrieval_ranks(image_emb, text_emb, t2i, progress=progress)
    seconds = time.perf_counter() - t0
    metrics = rank_metrics(t2i_rank, i2t_rank, ks)

    skips, warnings = skip_report(skipped, batches)
    extra: dict[str, Any] = {
        "n_samples": int(image_emb.shape[0]),
        "n_captions": int(text_emb.shape[0]),
        **skips,
        "seconds": round(seconds, 3),
    }
    if args.bootstrap:
        t_rank, i_rank = t2i_rank.cpu().numpy(), i2t_rank.cpu().numpy()
        # Each direction resamples its own queries: captions for text->image, images for
        # image->text.
        ci = bootstrap_ci(
            lambda i: {k: v for k, v in rank_metrics(t_rank[i], i_rank[:1], ks).items()
                       if k.startswith("image_")},
            len(t_rank), args.bootstrap, seed=args.seed, progress=progress,
        )  # fmt: skip
        ci.update(
            bootstrap_ci(
                lambda i: {
                    k: v
                    for k, v in rank_metrics(t_rank[:1], i_rank[i], ks).items()
                    if k.startswith("text_")
                },
                len(i_rank),
                args.bootstrap,
                seed=args.seed + 1,
                progress=progress,
            )  # fmt: skip
        )
        extra["bootstrap"] = args.bootstrap
        extra["metrics_ci95"] = {k: ci[k] for k in metrics}
    write_json(args.output, result_payload(args, "zeroshot_retrieval", metrics, **extra))
    shown = {k: v for k, v in metrics.items() if "recall@" in k}
    summary = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
    print(f"{dataset_name(args)}: {summary} -> {args.output}")
    for line in warnings:
        print(line, file=sys.stderr)
    return 0
