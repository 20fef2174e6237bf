r"""``clipkit wise-ft``: WiSE-FT weight-space ensembles (Wortsman et al. 2022).

One point: theta = (1 - alpha) * zero-shot + alpha * fine-tuned for every floating weight,
written as an open_clip-format export (what a training run's export/ is)::

    clipkit wise-ft --zeroshot runs/clip_cifar10 --finetuned runs/finetune_cifar10 \
        --alpha 0.5 --output runs/wise_ft

A sweep: each alpha evaluated zero-shot (clipkit eval zeroshot's driver) on each --eval set;
the output folder gets wise_ft.json, wise_ft.md (table) and wise_ft.png (trade-off plot), and
with --save-models each point's export as alpha_<a>/::

    clipkit wise-ft --zeroshot runs/clip_cifar10 --finetuned runs/finetune_cifar10 \
        --alphas 0,0.25,0.5,0.75,1 --eval ../shared/data/cifar10/test.tar \
        --classnames cifar10 --templates cifar10 --output runs/wise_ft_sweep

--zeroshot: an export, run or checkpoint folder, or what model.pretrained takes (a weights file,
an open_clip folder, or an open_clip tag of the fine-tuned run's model.name, from local files
only). --finetuned: an export, run or checkpoint folder. Both must be the same architecture.
--eval: DATA or NAME=DATA (any layout clipkit eval zeroshot reads); --classnames / --templates
apply to every set (default: each set's own class names).
Bad input (alpha outside [0, 1], other architectures or keys, an --output that exists) is one
line and exit status 2; the output folder is written whole or not at all.
"""

from __future__ import annotations

import argparse
import sys

from clipkit.models.wise_ft import check_alpha, check_new_folder, load_pair, new_folder, wise_ft


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags."""
    parser.add_argument("--zeroshot", required=True, help="zero-shot model (alpha 0)")
    parser.add_argument("--finetuned", required=True, help="fine-tuned model (alpha 1)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--alpha", type=float, help="one mixing weight in [0, 1]: write its export")
    mode.add_argument("--alphas", help="comma-separated weights to sweep, e.g. 0,0.25,0.5,0.75,1")
    parser.add_argument("--output", required=True, help="new folder (export, or sweep results)")
    parser.add_argument(
        "--eval", action="append", default=[], metavar="[NAME=]DATA",
        help="sweep: a labelled set to evaluate zero-shot at each alpha (repeatable)",
    )  # fmt: skip
    parser.add_argument("--classnames", default="", help="sweep: as clipkit eval zeroshot's")
    parser.add_argument("--templates", default="", help="sweep: as clipkit eval zeroshot's")
    parser.add_argument("--save-models", action="store_true", help="sweep: also write exports")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Check everything, then write one export or run the sweep. Errors: ValueError (one line)."""
    if args.alpha is not None:
        alpha = check_alpha(args.alpha)
        if args.eval or args.save_models:
            raise ValueError("--eval and --save-models go with --alphas (a sweep), not --alpha")
        output = check_new_folder(args.output)
        zs, ft = load_pair(args.zeroshot, args.finetuned)
        model = wise_ft(zs, ft, alpha)  # architecture checks before any write
        from clipkit.models.wise_ft import write_wise_ft

        write_wise_ft(model, output)
        print(f"wise-ft alpha={alpha:g} -> {output}")
        return 0
    return _sweep(args)


def _sweep(args: argparse.Namespace) -> int:
    from clipkit.eval.driver import pick_device
    from clipkit.eval.zeroshot_cli import ZeroShotOptions
    from clipkit.models.wise_ft import _point_hf_paths
    from clipkit.models.wise_ft_sweep import (
        RESULT_MD,
        check_sets,
        markdown_table,
        parse_alphas,
        parse_eval_sets,
        sweep,
        write_results,
    )

    alphas = parse_alphas(args.alphas)
    if not args.eval:
        raise ValueError("--alphas needs at least one --eval set (a sweep evaluates each alpha)")
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(
            f"--batch-size >= 1 and --workers >= 0 (got {args.batch_size}, {args.workers})"
        )
    sets = parse_eval_sets(args.eval)
    output = check_new_folder(args.output)
    zs, ft = load_pair(args.zeroshot, args.finetuned)
    wise_ft(zs, ft, alphas[0])  # architecture checks before any evaluation
    options = ZeroShotOptions(classnames=args.classnames, templates=args.templates)
    check_sets(sets, ft, options)
    with new_folder(output) as tmp:

        def save(alpha: float, model) -> None:
            if args.save_models:
                folder = tmp / f"alpha_{alpha:g}"
                model.export(folder)
                _point_hf_paths(folder, output / folder.name)

        rows = sweep(
            zs, ft, alphas, sets, options, device=pick_device(args.device),
            batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
            on_point=save,
        )  # fmt: skip
        meta = {"zeroshot": args.zeroshot, "finetuned": args.finetuned, "task": "wise_ft"}
        write_results(tmp, rows, sets, meta)
    sys.stdout.write(markdown_table(rows, sets))
    print(f"-> {output} ({RESULT_MD}, wise_ft.json, wise_ft.png)")
    return 0
