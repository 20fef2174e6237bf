r"""``clipkit eval zeroshot``: zero-shot classification, result JSON in CLIP_benchmark's shape.

Example (CPU, a trained run, CIFAR-10 test as a tar of an ImageFolder tree)::

    clipkit eval zeroshot --model runs/digits --data ../shared/data/cifar10/test.tar \
        --classnames cifar10 --templates cifar10 --output cifar10.json --bootstrap 1000

``--data``: an ImageFolder folder, a tar of one, WebDataset shards with ``cls`` labels (a tar,
a brace spec or a folder of tars) or a CLIP_benchmark WebDataset folder (its ``classnames.txt``
and ``zeroshot_classification_templates.txt`` are used unless ``--classnames``/``--templates``
are given).

The same :data:`EVALUATOR` runs inside training (``eval.zeroshot``), so both read the data alike.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from clipkit.eval import driver


@dataclass
class ZeroShotOptions:
    """Options of zero-shot classification (CLI flags of the same names)."""

    # Built-in name or file; empty: the data's own names (classnames.txt, else folder names).
    classnames: str = ""
    # Built-in name or file; empty: the data's templates file, else the built-in named like the
    # class names or the data set.
    templates: str = ""
    split: str = "test"  # split folder of a CLIP_benchmark layout
    per_class: bool = False  # add per-class recall and the confusion matrix


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classnames",
        default="",
        help="built-in (cifar10, cifar100, imagenet, digits) or file; default: the data's "
        "classnames.txt, else its folder names",
    )
    parser.add_argument(
        "--templates",
        default="",
        help="built-in (cifar10, cifar100, imagenet, imagenet7, digits) or file; default: the "
        "data's templates file, else the built-in named like --classnames or the data set",
    )
    parser.add_argument("--split", default="test", help="split folder of a CLIP_benchmark layout")
    parser.add_argument(
        "--per-class", action="store_true", help="add per-class recall and the confusion matrix"
    )


def resolve_prompts(
    data: str, options: ZeroShotOptions, ls: Any, dataset: str, *, flag: str = "--classnames"
) -> tuple[list[str], list[str]]:
    """Class names and templates for labelled set ``ls``; the rule the CLI and training share.

    Args:
        data: the data spec (for messages).
        options: ``classnames`` / ``templates`` specs (empty: from the data).
        ls: the opened :class:`~clipkit.eval.datasets.LabelledSet`.
        dataset: the data set's name (picks built-in templates when none are given).
        flag: how the user names the class-names option in messages (``eval.classnames`` in
            training).

    Returns:
        ``(classnames, templates)``; the names' count equals the set's classes when it has any.

    Raises:
        ValueError: no names or templates can be found, or the counts differ.
    """
    from clipkit.eval.prompts import BUILTIN_TEMPLATES, load_classnames, load_templates

    tflag = flag.replace("classnames", "templates")
    if options.classnames:
        classnames = load_classnames(options.classnames)
    elif ls.classes:
        classnames = list(ls.classes)
    else:
        raise ValueError(f"{flag} is needed: {data} carries no class names")
    if ls.classes is not None and len(classnames) != len(ls.classes):
        raise ValueError(
            f"{flag} {options.classnames} has {len(classnames)} names but {data} has "
            f"{len(ls.classes)} classes"
        )
    if options.templates:
        templates = load_templates(options.templates)
    elif ls.templates_file is not None:
        templates = load_templates(str(ls.templates_file))
    elif options.classnames in BUILTIN_TEMPLATES:  # built-in names bring their own prompts
        templates = load_templates(options.classnames)
    elif dataset in BUILTIN_TEMPLATES:
        templates = load_templates(dataset)
    else:
        raise ValueError(f"{tflag} is needed: no templates known for {data}")
    return classnames, templates


def run_zeroshot(ctx: driver.EvalContext) -> driver.Outcome:
    """Zero-shot classification of ``ctx.data`` (this rank's slice, gathered)."""
    from clipkit.eval.datasets import labelled_loader, open_labelled
    from clipkit.eval.zeroshot import (
        build_zeroshot_classifier,
        classification_metrics,
        confusion_matrix,
        per_class_recall,
        predict,
    )

    opts: ZeroShotOptions = ctx.options
    model = ctx.model
    ls = open_labelled(ctx.data, model.preprocess_eval, split=opts.split)
    classnames, templates = resolve_prompts(ctx.data, opts, ls, ctx.dataset)
    batches = ctx.watch(
        labelled_loader(
            ls, batch_size=ctx.batch_size, workers=ctx.workers, rank=ctx.rank,
            world_size=ctx.world_size,
        )
    )  # fmt: skip
    with ctx.autocast():
        classifier = build_zeroshot_classifier(
            model, classnames, templates, batch_size=ctx.batch_size, device=ctx.device,
            progress=ctx.progress,
        )  # fmt: skip
        preds = predict(
            model, batches, classifier, accelerator=ctx.accelerator, device=ctx.device,
            progress=ctx.progress,
        )  # fmt: skip
    c = len(classnames)
    topk, labels = preds.topk, preds.labels
    details: dict[str, Any] = {}
    if opts.per_class:
        recall, _ = per_class_recall(topk[:, 0], labels, c)
        support = [int((labels == k).sum()) for k in range(c)]
        details["per_class"] = {
            name: {"recall": None if r != r else float(r), "n": support[k]}
            for k, (name, r) in enumerate(zip(classnames, recall))
        }
        details["confusion_matrix"] = confusion_matrix(topk[:, 0], labels, c).tolist()
    return driver.Outcome(
        metrics=classification_metrics(topk, labels, c),
        counts={"n_samples": int(len(labels)), "n_classes": c, "n_templates": len(templates)},
        skipped=preds.skipped,
        skipped_shards=preds.skipped_shards,
        details=details,
        resamples=[
            driver.Resample(len(labels), lambda i: classification_metrics(topk[i], labels[i], c))
        ],
    )


EVALUATOR = driver.Evaluator(
    name="zeroshot",
    task="zeroshot_classification",
    options=ZeroShotOptions,
    run=run_zeroshot,
    add_options=_add_options,
)
