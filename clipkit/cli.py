"""The ``clipkit`` console script.

Subcommands are listed in one explicit registry and imported lazily, so ``clipkit --help`` is
fast and a missing optional extra only affects its own command. Each command module exposes
``add_arguments(parser)`` and ``run(args) -> int``, or, for an evaluator, an ``EVALUATOR``
(:class:`clipkit.eval.driver.Evaluator`) that the driver turns into the command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command path) -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("clipkit.train.cli", "train a dual encoder (same as scripts/train.py)"),
    ("eval", "zeroshot"): ("clipkit.eval.zeroshot_cli", "zero-shot classification"),
    ("eval", "retrieval"): ("clipkit.eval.retrieval_cli", "image-text retrieval"),
    ("eval", "sts"): ("clipkit.eval.sts_cli", "semantic textual similarity (Spearman)"),
    ("eval", "knn"): ("clipkit.eval.knn_cli", "weighted kNN classification of image features"),
    ("eval", "linear-probe"): ("clipkit.eval.linear_probe_cli", "linear probe on image features"),
    ("embed",): ("clipkit.embed.embed_cli", "embed shards/folders/captions into .npy + parquet"),
    ("index",): ("clipkit.embed.index_cli", "build or extend a faiss index"),
    ("serve",): ("clipkit.embed.serve_cli", "serve embedding + search over HTTP"),
    ("export",): ("clipkit.models.export_cli", "write a model as open_clip, HF or ONNX folder"),
    ("wise-ft",): ("clipkit.models.wise_ft_cli", "WiSE-FT: interpolate zero-shot and fine-tuned"),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


Leaves = dict[tuple[str, ...], argparse.ArgumentParser]

DESCRIPTION = "clipkit: train, evaluate and serve CLIP-style dual encoders."
EPILOG = """\
a typical session:
  clipkit train --config configs/default.yaml train.epochs=5
  clipkit eval zeroshot --model runs/digits/export --data cifar10/test.tar --classnames cifar10
  clipkit embed --model runs/digits --input 'shards/{00000..00009}.tar' --output emb/
  clipkit index --embeddings emb/ --output emb/index --audit 200
  clipkit serve --model runs/digits --index emb/index --port 8000

'clipkit COMMAND --help' shows a command's options and examples."""


def _build_parser() -> tuple[argparse.ArgumentParser, Leaves]:
    parser = argparse.ArgumentParser(
        prog="clipkit",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    leaves: Leaves = {}
    for path, (_, help_) in COMMANDS.items():
        if len(path) == 1:
            leaves[path] = top.add_parser(path[0], help=help_)
            continue
        if path[0] not in groups:
            g = top.add_parser(path[0], help=f"{path[0]} commands")
            groups[path[0]] = g.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        leaves[path] = groups[path[0]].add_parser(path[1], help=help_)
    return parser, leaves


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``clipkit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, leaves = _build_parser()
    # Find which leaf is asked for, then let its module add its own arguments.
    path = tuple(a for a in argv[:2] if not a.startswith("-"))
    key = path if path in COMMANDS else path[:1]
    if key not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module_name = COMMANDS[key][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        name = " ".join(key)
        print(f"clipkit {name}: unavailable ({err}); install the extra it needs", file=sys.stderr)
        return 2
    leaf = leaves[key]
    if module.__doc__:  # the module docstring holds the command's long help and examples
        leaf.description = module.__doc__.strip().replace("``", "")
        leaf.formatter_class = argparse.RawDescriptionHelpFormatter
    evaluator = getattr(module, "EVALUATOR", None)
    if evaluator is not None:  # an evaluator's command is built by the one driver
        from clipkit.eval import driver

        driver.add_arguments(leaf, evaluator)
    else:
        module.add_arguments(leaf)
    args = parser.parse_args(argv)
    try:
        if evaluator is not None:
            return driver.run_cli(evaluator, args)
        return int(module.run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as err:
        print(f"clipkit {' '.join(key)}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
