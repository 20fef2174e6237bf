"""Evaluators: zero-shot classification and image-text retrieval (CLIP_benchmark semantics).

Each evaluator returns a flat dict of metrics, runs distributed with an ``accelerate.Accelerator``
and serves the training loop, the ``clipkit eval`` CLI and the tests alike.
"""

from clipkit.eval.prompts import load_classnames, load_templates
from clipkit.eval.retrieval import retrieval  # the function shadows its module's name, on purpose
from clipkit.eval.zeroshot import build_zeroshot_classifier, zero_shot

__all__ = [
    "build_zeroshot_classifier",
    "load_classnames",
    "load_templates",
    "retrieval",
    "zero_shot",
]
