"""Evaluation inside the training loop: every rank embeds its slice, results are gathered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipkit.config.schema import Config
from clipkit.models import DualEncoder


def _dataset_name(spec: str, builtin: str) -> str:
    if builtin and "digits" in spec:
        return builtin
    p = Path(spec.split("{")[0])
    return (p.name or p.parent.name).removesuffix(".tar") or "data"


def evaluate_clip(
    cfg: Config, model: DualEncoder, accelerator: Any, *, zeroshot_spec: str
) -> dict[str, float]:
    """Zero-shot classification (and retrieval when ``eval.retrieval`` is set).

    Returns a flat dict such as ``{"zeroshot/digits/acc1": 0.93, ...}``.
    """
    from clipkit.eval import load_classnames, load_templates, zero_shot

    out: dict[str, float] = {}
    pp = model.clip.visual.preprocess_cfg
    if zeroshot_spec:
        from clipkit.data import build_eval_loader

        batches = build_eval_loader(
            zeroshot_spec,
            image_size=model.image_size,
            mean=pp["mean"],
            std=pp["std"],
            batch_size=cfg.eval.batch_size,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        metrics = zero_shot(
            model,
            batches,
            load_classnames(cfg.eval.classnames),
            load_templates(cfg.eval.templates),
            accelerator=accelerator,
            device=accelerator.device,
        )
        name = _dataset_name(zeroshot_spec, cfg.data.builtin)
        out.update({f"zeroshot/{name}/{k}": float(v) for k, v in metrics.items()})
    if cfg.eval.retrieval:
        from clipkit.eval import retrieval

        metrics = retrieval(
            model, cfg.eval.retrieval, batch_size=cfg.eval.batch_size, accelerator=accelerator
        )
        name = _dataset_name(cfg.eval.retrieval, "")
        out.update({f"retrieval/{name}/{k}": float(v) for k, v in metrics.items()})
    return out
