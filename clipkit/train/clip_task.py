"""The CLIP task: image-text pairs from shards -> DualEncoder -> contrastive loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipkit.config.schema import Config
from clipkit.models import DualEncoder, build_dual_encoder
from clipkit.train.task import Embeddings, Task


def _unwrap(model: nn.Module) -> DualEncoder:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def resolve_data(cfg: Config) -> tuple[str, str]:
    """(train spec, zero-shot eval spec), preparing the built-in demo set when asked."""
    train_spec, zs_spec = cfg.data.train, cfg.eval.zeroshot
    if cfg.data.builtin:
        if cfg.data.builtin != "digits":
            raise ValueError(f"unknown data.builtin '{cfg.data.builtin}'; valid: digits, or ''")
        from clipkit.data.digits import prepare_digits, shard_spec

        dirs = prepare_digits(cfg.data.cache_dir)
        train_spec = train_spec or shard_spec(dirs["train"])
        zs_spec = zs_spec or shard_spec(dirs["test"])
    if not train_spec:
        raise ValueError(
            "data.train is empty: give a shard spec, e.g. data.train='shards/{00000..00009}.tar'"
        )
    return train_spec, zs_spec


class ClipTask(Task):
    """Symmetric InfoNCE (or SigLIP) between image and caption embeddings."""

    def build_model(self, cfg: Config) -> nn.Module:
        from clipkit.data import DeviceNormalize

        model = build_dual_encoder(cfg.model, cfg.loss)
        pp = model.clip.visual.preprocess_cfg
        self._normalize = DeviceNormalize(pp["mean"], pp["std"])
        return model

    def build_train_data(self, cfg: Config, model: nn.Module, rank: int, world_size: int) -> Any:
        from dataclasses import replace

        from clipkit.data import build_train_loader

        m = _unwrap(model)
        train_spec, _ = resolve_data(cfg)
        pp = m.clip.visual.preprocess_cfg
        return build_train_loader(
            replace(cfg.data, train=train_spec),
            tokenizer=m.tokenize,
            image_size=m.image_size,
            mean=pp["mean"],
            std=pp["std"],
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world_size,
        )

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        image = batch["image"]  # (B, 3, S, S) uint8 from the loader: normalise on the device
        if image.dtype == torch.uint8:
            image = self._normalize(image)
        # Through the (possibly DDP-wrapped) forward so the scale's gradient is all-reduced too.
        out = model(image=image, text=batch["text"])
        return Embeddings(
            q=out["image"],  # (B, D)
            k=out["text"],  # (B, D)
            logit_scale=out["logit_scale"],
            logit_bias=out.get("logit_bias"),
        )

    def logit_scale(self, model: nn.Module) -> torch.Tensor | None:
        return _unwrap(model).clip.logit_scale.exp()

    def check_inputs(self, cfg: Config, model: nn.Module) -> None:
        """Every evaluation set opens and matches its class names (see ``check_eval_inputs``)."""
        from clipkit.train.evaluation import check_eval_inputs

        check_eval_inputs(cfg, _unwrap(model))

    def evaluate(
        self, cfg: Config, model: nn.Module, accelerator: Any, step: int
    ) -> dict[str, float]:
        from clipkit.train.evaluation import evaluate_clip

        _, zs_spec = resolve_data(cfg)
        return evaluate_clip(cfg, _unwrap(model), accelerator, zeroshot_spec=zs_spec)

    def export(self, cfg: Config, model: nn.Module, out_dir: str) -> None:
        _unwrap(model).export(Path(out_dir))
