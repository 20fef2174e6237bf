r"""``clipkit eval zeroshot``: zero-shot classification, result JSON in CLIP_benchmark's shape.

Example (CPU, a trained run, CIFAR-10 test as a tar of an ImageFolder tree)::

    clipkit eval zeroshot --model runs/digits --data ../shared/data/cifar10/test.tar \
        --classnames cifar10 --templates cifar10 --output cifar10.json --bootstrap 1000

``--data``: an ImageFolder folder, a tar of one, WebDataset shards with ``cls`` labels (a tar,
a brace spec or a folder of tars) or a CLIP_benchmark WebDataset folder (its ``classnames.txt``
and ``zeroshot_classification_templates.txt`` are used unless ``--classnames``/``--templates``
are given).
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
        "data's templates file, else the built-in named like the data set",
    )
    parser.add_argument("--split", default="test", help="split folder of a CLIP_benchmark layout")
    parser.add_argument(
        "--per-class", action="store_true", help="add per-class recall and the confusion matrix"
    )


def _resolve_prompts(args: argparse.Namespace, ls: Any) -> tuple[list[str], list[str]]:
    from clipkit.eval.prompts import BUILTIN_TEMPLATES, load_classnames, load_templates

    if args.classnames:
        classnames = load_classnames(args.classnames)
    elif ls.classes:
        classnames = list(ls.classes)
    else:
        raise ValueError(f"--classnames is needed: {args.data} carries no class names")
    if ls.classes is not None and len(classnames) != len(ls.classes):
        raise ValueError(
            f"--classnames {args.classnames} has {len(classnames)} names but {args.data} has "
            f"{len(ls.classes)} classes"
        )
    if args.templates:
        templates = load_templates(args.templates)
    elif ls.templates_file is not None:
        templates = load_templates(str(ls.templates_file))
    elif dataset_name(args) in BUILTIN_TEMPLATES:
        templates = load_templates(dataset_name(args))
    else:
        raise ValueError(f"--templates is needed: no templates known for {args.data}")
    return classnames, templates


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the JSON, print a one-line summary. Returns the exit status."""
    from clipkit.eval.bootstrap import bootstrap_ci
    from clipkit.eval.datasets import labelled_loader, open_labelled
    from clipkit.eval.zeroshot import (
        build_zeroshot_classifier,
        classification_metrics,
        confusion_matrix,
        per_class_recall,
        predict,
    )

    check_common(args)
    device = pick_device(args.device)
    progress = not args.no_progress
    model = load_model(args.model, args.pretrained, args.seed).to(device).eval()
    ls = open_labelled(args.data, model.preprocess_eval, split=args.split)
    classnames, templates = _resolve_prompts(args, ls)

    t0 = time.perf_counter()
    batches = SkipLog(labelled_loader(ls, batch_size=args.batch_size, workers=args.workers))
    with autocast(device, args.precision):
        classifier = build_zeroshot_classifier(
            model, classnames, templates, batch_size=args.batch_size, progress=progress
        )
        preds = predict(model, batches, classifier, progress=progress)
    seconds = time.perf_counter() - t0

    c = len(classnames)
    metrics = classification_metrics(preds.topk, preds.labels, c)
    skips, warnings = skip_report(preds.skipped, batches)
    extra: dict[str, Any] = {
        "n_samples": int(len(preds.labels)),
        **skips,
        "n_classes": c,
        "n_templates": len(templates),
        "seconds": round(seconds, 3),
    }
    if args.bootstrap:
        extra["bootstrap"] = args.bootstrap
        extra["metrics_ci95"] = bootstrap_ci(
            lambda i: classification_metrics(preds.topk[i], preds.labels[i], c),
            len(preds.labels),
            args.bootstrap,
            seed=args.seed,
            progress=progress,
        )
    if args.per_class:
        recall, _ = per_class_recall(preds.topk[:, 0], preds.labels, c)
        support = [int((preds.labels == k).sum()) for k in range(c)]
        extra["per_class"] = {
            name: {"recall": None if r != r else float(r), "n": support[k]}
            for k, (name, r) in enumerate(zip(classnames, recall))
        }
        extra["confusion_matrix"] = confusion_matrix(preds.topk[:, 0], preds.labels, c).tolist()
    write_json(args.output, result_payload(args, "zeroshot_classification", metrics, **extra))
    summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    print(f"{dataset_name(args)}: {summary} n={extra['n_samples']} -> {args.output}")
    for line in warnings:
        print(line, file=sys.stderr)
    return 0
