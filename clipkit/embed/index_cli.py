"""``clipkit index``: build or extend a faiss index from ``clipkit embed`` output.

Example:
    clipkit index --embeddings /tmp/coco_emb --output /tmp/coco_index --audit 200
    clipkit index --embeddings /tmp/coco_emb --output /tmp/coco_index --add   # new partitions
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from clipkit.embed.index import KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clipkit index``."""
    parser.add_argument("--embeddings", required=True, help="folder written by clipkit embed")
    parser.add_argument("--output", required=True, help="index folder")
    parser.add_argument("--modality", default="image", choices=["image", "text"])
    parser.add_argument("--kind", default="auto", choices=KINDS)
    parser.add_argument("--memory-budget-gb", type=float, default=8.0)
    parser.add_argument("--add", action="store_true", help="add new ids to an existing index")
    parser.add_argument(
        "--audit",
        type=int,
        default=0,
        metavar="N",
        help="report recall@10 against exact search on N sampled queries",
    )


def run(args: argparse.Namespace) -> int:
    """Run the command; prints a one-line JSON summary."""
    import pandas as pd

    from clipkit.embed.catalog import METADATA_FILE
    from clipkit.embed.dataset import load_embeddings
    from clipkit.embed.index import META_FILE, Index

    x, meta, manifest = load_embeddings(args.embeddings, args.modality)
    x = x.astype(np.float32)  # (N, D)
    ids = meta["id"].to_numpy(np.int64)
    model = {**manifest["model"], "modality": args.modality}
    out = Path(args.output).expanduser()
    exists = (out / META_FILE).is_file()
    if exists and not args.add:
        raise ValueError(f"{out} already holds an index; pass --add to extend it")
    if args.add and not exists:
        raise ValueError(f"--add: no index at {out}")
    if args.add:
        index = Index.load(out)
        if index.model.get("modality", args.modality) != args.modality:
            raise ValueError(
                f"{out} indexes {index.model['modality']} vectors, not {args.modality}"
            )
        new = ~np.isin(ids, index.ids())
        index.add(x[new], ids[new], model_id=model["model_id"], progress=True)
        old_meta = pd.read_parquet(out / METADATA_FILE)
        meta = pd.concat([old_meta, meta[new]], ignore_index=True)
        added = int(new.sum())
    else:
        if len(x) == 0:
            raise ValueError(f"{args.embeddings}: no vectors to index")
        index = Index.build(
            x,
            ids,
            kind=args.kind,
            model=model,
            memory_budget_gb=args.memory_budget_gb,
            progress=True,
        )
        added = len(x)
    index.info.setdefault("sources", [])
    if str(args.embeddings) not in index.info["sources"]:
        index.info["sources"].append(str(args.embeddings))
    index.save(out)
    tmp = out / (METADATA_FILE + ".tmp")
    meta.to_parquet(tmp, index=False)
    tmp.replace(out / METADATA_FILE)
    summary = {
        "output": str(out),
        "kind": index.kind,
        "ntotal": len(index),
        "added": added,
        "dim": index.dim,
        "model_id": model["model_id"],
    }
    if args.audit:
        summary.update(index.audit(x, ids, n_queries=args.audit, k=10))
    print(json.dumps(summary))
    return 0
