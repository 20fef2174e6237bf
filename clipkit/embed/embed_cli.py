"""``clipkit embed``: embed shards / an image folder / a caption file into .npy + parquet.

Example:
    clipkit embed --model runs/coco/export --input ../shared/data/coco_mini/captions.tsv \
        --output /tmp/coco_emb

Rerunning the same command resumes; if the input, model or settings changed since, it stops
with an error instead, and ``--overwrite`` starts afresh.
"""

from __future__ import annotations

import argparse
import json

from clipkit.embed.dataset import MODALITIES
from clipkit.embed.sources import SOURCE_KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clipkit embed``."""
    parser.add_argument("--model", required=True, help="export dir, run dir or open_clip:ARCH")
    parser.add_argument("--weights", default=None, help="weights file for open_clip:ARCH")
    parser.add_argument("--input", required=True, help="shard spec, image folder or caption file")
    parser.add_argument(
        "--output", required=True, help="output folder; a rerun with the same input resumes"
    )
    parser.add_argument("--kind", default="auto", choices=SOURCE_KINDS)
    parser.add_argument("--modality", default="auto", choices=MODALITIES)
    parser.add_argument("--partition-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the partitions of an earlier run in --output and embed afresh",
    )


def run(args: argparse.Namespace) -> int:
    """Run the command; prints a one-line JSON summary."""
    from clipkit.embed.dataset import check_output, embed_dataset
    from clipkit.embed.embedder import Embedder

    check_output(args.output)  # before the model is loaded
    emb = Embedder.load(args.model, args.weights, device=args.device, precision=args.precision)
    man = embed_dataset(
        emb,
        args.input,
        args.output,
        kind=args.kind,
        modality=args.modality,
        partition_size=args.partition_size,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    parts = man["partitions"].values()
    summary = {
        "output": args.output,
        "modality": man["modality"],
        "partitions": len(man["partitions"]),
        "records": sum(p["records"] for p in parts),
        "skipped": sum(p["skipped"] for p in parts),
        "model_id": man["model"]["model_id"],
    }
    if "skipped_shards" in man:  # shard inputs: truncated/unreadable shards, dropped samples
        summary["skipped_shards"] = man["skipped_shards"]
        summary["incomplete_samples"] = man["incomplete_samples"]
    print(json.dumps(summary))
    return 0
