"""The one evaluation driver: everything around an evaluator that is not the evaluation itself.

An evaluator is a pure function (``zero_shot``, ``retrieval``, ``sts_scores``, ...) plus a small
registration, an :class:`Evaluator`: its options (a dataclass whose fields are also its CLI flags),
a ``run(ctx) -> Outcome`` that reads the data through :mod:`clipkit.eval.datasets` and calls the
pure function, and the CLIP_benchmark task name. The driver does the rest, once, for the
``clipkit eval`` commands and for evaluation inside training alike:

* model loading (:func:`load_model`: export, run or checkpoint folder, ``open_clip:ARCH``),
  device choice and precision (autocast for bf16/fp16);
* ranks: ``ctx.rank`` / ``ctx.world_size`` split the data, the evaluators gather (accelerator);
* timing, percentile-bootstrap CIs (the ``Outcome``'s resamples), skip reporting (unreadable
  samples and damaged shards: counts, examples, one warning line each);
* the result: :class:`Report`, as CLIP_benchmark-shaped JSON (:meth:`Report.payload`, written
  atomically by :func:`write_json`) or as flat scalars for the training log
  (:meth:`Report.scalars`).

Adding an evaluator (kNN, linear probe): write the pure function, a ``run(ctx)`` of a few lines,
an ``Evaluator(...)`` named ``EVALUATOR`` in a ``clipkit/eval/<name>_cli.py`` whose docstring is
the command's help; list that module in ``clipkit.cli.COMMANDS`` (the console script builds the
command with :func:`add_arguments` and runs it with :func:`run_cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipkit.train.outputs import check_output_file

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- model and device
def pick_device(spec: str) -> torch.device:
    """``spec`` as a device; empty means CUDA when available, else CPU."""
    if spec:
        return torch.device(spec)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(spec: str, pretrained: str = "", seed: int = 0) -> Any:
    """A DualEncoder from ``--model``/``--pretrained`` (:func:`clipkit.models.load.load_model`)."""
    from clipkit.models.load import load_model as load

    return load(spec, pretrained, seed)[0]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16; nothing for fp32 (the default, and what the agreement test uses)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------- skips
class SkipLog:
    """Passes batches through, remembering which images were unreadable and which shards broke."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.keys: list[str] = []
        self.shard_keys: list[str] = []  # one line per truncated/unreadable shard

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            if isinstance(b, dict):
                self.keys.extend(b.get("skipped_keys", []))
                self.shard_keys.extend(b.get("skipped_shard_keys", []))
            yield b


def skip_report(
    skipped: int, log: SkipLog, skipped_shards: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Result-JSON fields and stderr warnings for what an evaluation could not read.

    Args:
        skipped: unreadable or incomplete samples (all ranks).
        log: this rank's :class:`SkipLog` (the examples come from it).
        skipped_shards: damaged shards over all ranks; default: those in ``log``.

    Returns:
        ``({"skipped", "skipped_examples", "skipped_shards", "skipped_shard_examples"},
        warning lines)``.
    """
    n_shards = len(log.shard_keys) if skipped_shards is None else skipped_shards
    extra = {
        "skipped": skipped,
        "skipped_examples": log.keys[:10],
        "skipped_shards": n_shards,
        "skipped_shard_examples": log.shard_keys[:10],
    }
    lines = []
    if skipped:
        example = log.keys[0] if log.keys else "?"
        lines.append(
            f"warning: skipped {skipped} unreadable or incomplete sample(s), e.g. {example}"
        )
    if n_shards:
        example = log.shard_keys[0] if log.shard_keys else "?"
        lines.append(
            f"warning: {n_shards} shard(s) truncated or unreadable, their readable samples kept, "
            f"e.g. {example}"
        )
    return extra, lines


# --------------------------------------------------------------------------- the contract
@dataclass
class EvalContext:
    """What an evaluator's ``run`` gets: the model, the data spec and how to run."""

    model: Any
    data: str
    options: Any  # the evaluator's options dataclass
    device: torch.device
    dataset: str = ""  # the data set's name in results
    batch_size: int = 256
    workers: int = 0
    precision: str = "fp32"
    accelerator: Any = None  # with one, ranks read disjoint slices and the evaluators gather
    progress: bool = False
    prepared: Any = None  # what the evaluator's ``prepare`` returned (read before the model)
    log: SkipLog = field(default_factory=lambda: SkipLog(()))

    @property
    def rank(self) -> int:
        """This process's rank (0 without an accelerator)."""
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world_size(self) -> int:
        """Number of processes sharing the data (1 without an accelerator)."""
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision's autocast; wrap the model's forward passes, not the metric math."""
        return autocast(self.device, self.precision)

    def watch(self, batches: Iterable[Any]) -> SkipLog:
        """Pass ``batches`` through this run's :class:`SkipLog` (for the skip report)."""
        self.log = SkipLog(batches)
        return self.log

    def sum_over_ranks(self, *counts: int) -> list[int]:
        """Per-rank integer counts summed over all ranks (identity on one process)."""
        if self.accelerator is None or self.world_size == 1:
            return [int(c) for c in counts]
        t = torch.tensor(counts, device=self.accelerator.device)
        return [int(c) for c in self.accelerator.reduce(t, "sum").tolist()]


@dataclass(frozen=True)
class Resample:
    """One bootstrap unit: ``stat`` recomputes metrics from ``(n,)`` query indices."""

    n: int
    stat: Callable[[np.ndarray], dict[str, float]]


@dataclass
class Outcome:
    """What an evaluator's ``run`` returns (identical on every rank)."""

    metrics: dict[str, Any]  # the JSON's "metrics" (CLIP_benchmark's names)
    counts: dict[str, int]  # sizes, e.g. {"n_samples": 10000, "n_classes": 10}; first = "n"
    skipped: int = 0  # unreadable or incomplete samples, all ranks
    skipped_shards: int = 0  # truncated or unreadable shards, all ranks
    details: dict[str, Any] = field(default_factory=dict)  # more JSON fields (per_class, ...)
    resamples: list[Resample] = field(default_factory=list)  # bootstrap units, seeds seed+i
    summary: str = ""  # the stdout text; default: "name: k=v ... n=N"


@dataclass(frozen=True)
class Evaluator:
    """An evaluator as the driver runs it.

    Attributes:
        name: command and metric-prefix name (``zeroshot``).
        task: the task name in the result JSON (CLIP_benchmark's, e.g. ``zeroshot_retrieval``).
        options: dataclass of the evaluator's options; each field is also a CLI flag of the
            same name (``per_class`` -> ``--per-class``), which :func:`add_arguments` leaves to
            ``add_options`` to declare with its help.
        run: ``ctx -> Outcome``.
        add_options: declares the option flags on an argparse parser.
        prepare: ``(data, options) -> anything``, run before the model is loaded so a bad path
            or option fails in seconds; its result is ``ctx.prepared``.
        load: ``(model spec, pretrained, seed, options) -> model``; default :func:`load_model`.
        model_help: the ``--model`` help when ``load`` takes other models.
        model_name: ``model spec -> `` the name recorded in the JSON (default: the spec).
        defaults: CLI defaults that differ from the common ones (e.g. ``{"batch_size": 128}``).
        bootstrap: whether ``--bootstrap`` applies (the outcome carries resamples).
    """

    name: str
    task: str
    options: type
    run: Callable[[EvalContext], Outcome]
    add_options: Callable[[argparse.ArgumentParser], None]
    prepare: Callable[[str, Any], Any] | None = None
    load: Callable[[str, str, int, Any], Any] | None = None
    model_help: str = ""
    model_name: Callable[[str], str] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    bootstrap: bool = True

    def options_from(self, args: argparse.Namespace) -> Any:
        """The options dataclass filled from parsed CLI arguments of the same names."""
        names = [f.name for f in dataclasses.fields(self.options)]
        return self.options(**{n: getattr(args, n) for n in names if hasattr(args, n)})


@dataclass
class Report:
    """An evaluation's result, on every rank."""

    evaluator: Evaluator
    dataset: str
    outcome: Outcome
    precision: str
    seconds: float
    ci95: dict[str, list[float]] | None = None
    bootstrap: int = 0
    skip_fields: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        """The JSON's ``metrics``."""
        return self.outcome.metrics

    def scalars(self) -> dict[str, float]:
        """Flat floats for a training log: metrics (nested ones as ``a/b``), ``n``, the other
        counts, ``skipped`` and ``skipped_shards``."""
        out: dict[str, float] = {}

        def put(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    put(f"{prefix}/{k}" if prefix else str(k), v)
            elif isinstance(value, (int, float)):
                out[prefix] = float(value)

        put("", self.outcome.metrics)
        counts = list(self.outcome.counts.items())
        if counts:
            out["n"] = float(counts[0][1])
            out.update({k: float(v) for k, v in counts[1:]})
        out["skipped"] = float(self.outcome.skipped)
        out["skipped_shards"] = float(self.outcome.skipped_shards)
        return out

    def payload(self, model: str, pretrained: str = "") -> dict[str, Any]:
        """CLIP_benchmark's result shape plus clipkit's additions (top-level keys)."""
        o = self.outcome
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "model": model,
            "pretrained": pretrained,
            "task": self.evaluator.task,
            "metrics": o.metrics,
            "language": "en",
            "precision": self.precision,
            **o.counts,
            **self.skip_fields,
            "seconds": round(self.seconds, 3),
        }
        if self.ci95 is not None:
            out["bootstrap"] = self.bootstrap
            out["metrics_ci95"] = self.ci95
        out.update(o.details)
        out["versions"] = library_versions()
        return out

    def summary(self, output: str = "") -> str:
        """The one-line (or evaluator-made) stdout summary."""
        text = self.outcome.summary
        if not text:
            shown = " ".join(
                f"{k}={v:.4f}" for k, v in self.metrics.items() if isinstance(v, (int, float))
            )
            n = next(iter(self.outcome.counts.values()), None)
            text = f"{self.dataset}: {shown}" + (f" n={n}" if n is not None else "")
        return text + (f" -> {output}" if output else "")


# --------------------------------------------------------------------------- running
def evaluate(
    evaluator: Evaluator,
    model: Any,
    data: str,
    options: Any = None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    workers: int = 0,
    precision: str = "fp32",
    accelerator: Any = None,
    bootstrap: int = 0,
    seed: int = 0,
    progress: bool = False,
    dataset: str = "",
    prepared: Any = None,
) -> Report:
    """Run ``evaluator`` on ``model`` over ``data``: the one path of the CLI and of training.

    Args:
        evaluator: e.g. ``clipkit.eval.zeroshot_cli.EVALUATOR``.
        model: the model, already on ``device`` (a DualEncoder; STS: a SentenceEncoder).
        data: the data spec the evaluator's readers take.
        options: an instance of ``evaluator.options`` (default: its defaults).
        device: where to run; default the accelerator's, else :func:`pick_device`'s.
        batch_size: images (or sentences) per batch.
        workers: DataLoader worker processes.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast around the forward passes).
        accelerator: with one, every rank reads its slice and gets the gathered result.
        bootstrap: resamples for 95% CIs (0 = none).
        seed: bootstrap seed.
        progress: show progress bars.
        dataset: name in the result (default: from ``data``).
        prepared: ``evaluator.prepare``'s result when already computed.

    Returns:
        A :class:`Report` (same numbers on every rank).

    Raises:
        ValueError: a bad precision, or whatever the evaluator's readers and checks raise.

    Example:
        >>> from clipkit.eval.zeroshot_cli import EVALUATOR, ZeroShotOptions
        >>> rep = evaluate(EVALUATOR, model, "cifar10/test.tar", ZeroShotOptions("cifar10"))
        >>> rep.metrics["acc1"]
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} (got '{precision}')")
    options = evaluator.options() if options is None else options
    if prepared is None and evaluator.prepare is not None:
        prepared = evaluator.prepare(data, options)
    if device is None:
        device = accelerator.device if accelerator is not None else pick_device("")
    dataset = dataset or dataset_name(data)
    ctx = EvalContext(
        model=model, data=data, options=options, dataset=dataset, device=torch.device(device),
        batch_size=batch_size, workers=workers, precision=precision, accelerator=accelerator,
        progress=progress, prepared=prepared,
    )  # fmt: skip
    t0 = time.perf_counter()
    outcome = evaluator.run(ctx)
    seconds = time.perf_counter() - t0
    skip_fields, warnings = skip_report(outcome.skipped, ctx.log, outcome.skipped_shards)
    report = Report(
        evaluator, dataset, outcome, precision, seconds,
        skip_fields=skip_fields, warnings=warnings,
    )  # fmt: skip
    if bootstrap:
        from clipkit.eval.bootstrap import bootstrap_ci

        if not outcome.resamples:
            raise ValueError(f"--bootstrap does not apply to {evaluator.name}")
        ci: dict[str, list[float]] = {}
        for i, r in enumerate(outcome.resamples):
            ci.update(bootstrap_ci(r.stat, r.n, bootstrap, seed=seed + i, progress=progress))
        report.ci95 = {k: ci[k] for k in outcome.metrics if k in ci}
        report.bootstrap = bootstrap
    return report


def add_arguments(parser: argparse.ArgumentParser, evaluator: Evaluator) -> None:
    """The options of every ``clipkit eval`` command, then the evaluator's own."""
    parser.add_argument(
        "--model",
        required=True,
        help=evaluator.model_help
        or "export folder, training run folder (uses <run>/export), checkpoint folder "
        "(config.yaml + model.safetensors) or open_clip:ARCH",
    )
    parser.add_argument("--pretrained", default="", help="local weights file for open_clip:ARCH")
    parser.add_argument("--data", required=True, help="evaluation data (layouts above)")
    parser.add_argument("--output", default="", help="result JSON path (default: print only)")
    parser.add_argument(
        "--dataset-name", default="", help="name in the JSON (default: from --data)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:1 (default: cuda if any)")
    if evaluator.bootstrap:
        parser.add_argument(
            "--bootstrap", type=int, default=0, metavar="N", help="N resamples for 95%% CIs"
        )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap and random-init seed")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    evaluator.add_options(parser)
    parser.set_defaults(**evaluator.defaults)


def check_common(args: argparse.Namespace) -> None:
    """Validate shared options before any work; raises ValueError with one line."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0 (got {args.workers})")
    if getattr(args, "bootstrap", 0) < 0:
        raise ValueError(f"--bootstrap must be >= 0 (got {args.bootstrap})")
    if args.output:
        check_output_file(args.output)


def run_cli(evaluator: Evaluator, args: argparse.Namespace) -> int:
    """``clipkit eval <name>``: check, load, evaluate, write the JSON, print the summary.

    Returns:
        The exit status (0); errors are raised as ValueError for the CLI's one-line report.
    """
    check_common(args)
    options = evaluator.options_from(args)
    # Data and options are read before the model, so a mistake there costs no model load.
    prepared = evaluator.prepare(args.data, options) if evaluator.prepare else None
    device = pick_device(args.device)
    if evaluator.load is not None:
        model = evaluator.load(args.model, args.pretrained, args.seed, options)
    else:
        model = load_model(args.model, args.pretrained, args.seed)
    model = model.to(device).eval()
    report = evaluate(
        evaluator, model, args.data, options, device=device, batch_size=args.batch_size,
        workers=args.workers, precision=args.precision, bootstrap=getattr(args, "bootstrap", 0),
        seed=args.seed, progress=not args.no_progress,
        dataset=dataset_name(args.data, args.dataset_name), prepared=prepared,
    )  # fmt: skip
    if args.output:
        name = evaluator.model_name(args.model) if evaluator.model_name else args.model
        write_json(args.output, report.payload(name, args.pretrained))
    print(report.summary(args.output))
    for line in report.warnings:
        print(line, file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- result files
def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers, for the result JSON."""
    import open_clip

    import clipkit

    return {
        "clipkit": clipkit.__version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
    }


def dataset_name(data: str, override: str = "") -> str:
    """The data set's name in results: ``override``, else from the path
    (``cifar10/test.tar`` -> ``cifar10``, ``coco_mini/captions.tsv`` -> ``coco_mini``)."""
    if override:
        return override
    p = Path(data.split("{")[0].rstrip("/"))
    name = p.stem if p.suffix else p.name
    return name if name not in ("test", "captions", "") else (p.parent.name or name)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write atomically, so a crash never leaves half a result file.

    Raises:
        ValueError: the write failed (full disk, a folder in the way), in one line; the
            temporary file is removed.
    """
    p = Path(path).expanduser()
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(p)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write {p}: {err.strerror or err}") from None


__all__ = [
    "EvalContext",
    "Evaluator",
    "Outcome",
    "Report",
    "Resample",
    "SkipLog",
    "add_arguments",
    "autocast",
    "check_common",
    "check_output_file",
    "dataset_name",
    "evaluate",
    "load_model",
    "pick_device",
    "run_cli",
    "skip_report",
    "write_json",
]
