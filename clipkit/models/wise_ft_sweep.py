"""The WiSE-FT alpha sweep: each mixing weight evaluated zero-shot on given labelled sets.

Every point goes through the one evaluation driver (:func:`clipkit.eval.driver.evaluate` with
the zero-shot :data:`~clipkit.eval.zeroshot_cli.EVALUATOR`), so a sweep's alpha 0 / 1 numbers
are what ``clipkit eval zeroshot`` reports for the two inputs. The result folder holds
``wise_ft.json`` (every metric of every point), ``wise_ft.md`` (the acc1 table) and
``wise_ft.png`` (acc1 against alpha; with two or more sets also the first against the second,
the trade-off plot of Wortsman et al. 2022, Fig. 1), written whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipkit.models.dual_encoder import DualEncoder
from clipkit.models.wise_ft import check_alpha, wise_ft

RESULT_JSON, RESULT_MD, RESULT_PNG = "wise_ft.json", "wise_ft.md", "wise_ft.png"


@dataclass(frozen=True)
class EvalSet:
    """A labelled set of the sweep: its name in the table and its data spec."""

    name: str
    data: str


def parse_alphas(text: str) -> list[float]:
    """``"0,0.25,0.5"`` -> ``[0.0, 0.25, 0.5]`` (each in [0, 1], no repeats).

    Raises:
        ValueError: one line naming the bad entry.
    """
    out: list[float] = []
    for part in text.split(","):
        try:
            a = float(part)
        except ValueError:
            raise ValueError(
                f"--alphas: '{part}' is not a number (e.g. 0,0.25,0.5,0.75,1)"
            ) from None
        out.append(check_alpha(a, "--alphas entries"))
    if len(set(out)) != len(out):
        raise ValueError(f"--alphas repeats a value: {text}")
    return out


def parse_eval_sets(specs: list[str]) -> list[EvalSet]:
    """``--eval`` values (``DATA`` or ``NAME=DATA``) as named sets (names from the data like
    ``clipkit eval``'s; unique).

    Raises:
        ValueError: a repeated name (one line).
    """
    from clipkit.eval.driver import dataset_name

    sets = []
    for spec in specs:
        name, sep, data = spec.partition("=")
        if not sep or "/" in name:  # a path holding "=" is a path
            name, data = "", spec
        sets.append(EvalSet(name or dataset_name(data), data))
    names = [s.name for s in sets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"--eval: two sets are called '{dup}'; name them NAME=DATA")
    return sets


def check_sets(sets: list[EvalSet], model: DualEncoder, options: Any) -> None:
    """Open every set and resolve its class names and templates before any evaluation, so a
    bad path or a count mismatch fails in seconds (one line)."""
    from clipkit.eval.datasets import open_labelled
    from clipkit.eval.zeroshot_cli import resolve_prompts

    for s in sets:
        ls = open_labelled(s.data, model.preprocess_eval, split=options.split)
        resolve_prompts(s.data, options, ls, s.name)


def sweep(
    zeroshot: DualEncoder,
    finetuned: DualEncoder,
    alphas: list[float],
    sets: list[EvalSet],
    options: Any,
    *,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
    on_point: Any = None,
) -> list[dict[str, Any]]:
    """Evaluate the WiSE-FT model at each alpha on each set.

    Args:
        zeroshot / finetuned: the two models (same architecture), on the CPU.
        alphas: mixing weights in [0, 1].
        sets: labelled sets (zero-shot classification).
        options: :class:`~clipkit.eval.zeroshot_cli.ZeroShotOptions` for every set.
        device: where to evaluate.
        batch_size / workers / progress: as ``clipkit eval``'s.
        on_point: ``(alpha, model) -> None`` called with each point's model (to save it).

    Returns:
        ``[{"alpha": a, "metrics": {set name: metrics}, "n": {set name: n_samples},
        "seconds": s}, ...]`` in the order of ``alphas``.
    """
    from clipkit.eval import driver
    from clipkit.eval.zeroshot_cli import EVALUATOR

    rows = []
    for a in alphas:
        model = wise_ft(zeroshot, finetuned, a)
        if on_point is not None:
            on_point(a, model)
        model = model.to(device).eval()
        row: dict[str, Any] = {"alpha": a, "metrics": {}, "n": {}, "seconds": 0.0}
        for s in sets:
            rep = driver.evaluate(
                EVALUATOR, model, s.data, options, device=device, batch_size=batch_size,
                workers=workers, progress=progress, dataset=s.name,
            )  # fmt: skip
            row["metrics"][s.name] = rep.metrics
            row["n"][s.name] = rep.outcome.counts["n_samples"]
            row["seconds"] += rep.seconds
        rows.append(row)
        del model
    return rows


def markdown_table(rows: list[dict[str, Any]], sets: list[EvalSet]) -> str:
    """The acc1 table: one row per alpha, one column per set."""
    head = "| alpha | " + " | ".join(f"{s.name} acc1" for s in sets) + " |"
    rule = "|---|" + "---|" * len(sets)
    body = [
        f"| {r['alpha']:g} | "
        + " | ".join(f"{r['metrics'][s.name]['acc1']:.4f}" for s in sets)
        + " |"
        for r in rows
    ]
    return "\n".join([head, rule, *body]) + "\n"


def plot(rows: list[dict[str, Any]], sets: list[EvalSet], path: Path, title: str = "") -> None:
    """acc1 against alpha per set; with two or more sets, also set 1 against set 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    acc = {s.name: [r["metrics"][s.name]["acc1"] for r in rows] for s in sets}
    n = 2 if len(sets) >= 2 else 1
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    ax = axes[0][0]
    for s in sets:
        ax.plot(alphas, acc[s.name], marker="o", label=s.name)
    ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    ax.set_ylabel("zero-shot top-1 accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    if n == 2:
        x, y = sets[0].name, sets[1].name
        ax = axes[0][1]
        ax.plot(acc[x], acc[y], marker="o", color="tab:purple")
        for a, xi, yi in zip(alphas, acc[x], acc[y]):
            ax.annotate(f"{a:g}", (xi, yi), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(f"{x} acc1")
        ax.set_ylabel(f"{y} acc1")
        ax.set_title("trade-off (labels: alpha)")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    folder: Path, rows: list[dict[str, Any]], sets: list[EvalSet], meta: dict[str, Any]
) -> None:
    """``wise_ft.json``, ``wise_ft.md`` and ``wise_ft.png`` into ``folder``."""
    from clipkit.eval.driver import library_versions

    payload = {
        **meta,
        "sets": {s.name: s.data for s in sets},
        "points": rows,
        "versions": library_versions(),
    }
    (folder / RESULT_JSON).write_text(json.dumps(payload, indent=2) + "\n")
    (folder / RESULT_MD).write_text(markdown_table(rows, sets))
    plot(rows, sets, folder / RESULT_PNG, title="WiSE-FT")


__all__ = [
    "EvalSet",
    "check_sets",
    "markdown_table",
    "parse_alphas",
    "parse_eval_sets",
    "plot",
    "sweep",
    "write_results",
]
