"""The CLIP task: image-text pairs from shards -> DualEncoder -> contrastive loss.

With ``loss.ssl_weight > 0`` it is SLIP (Mu et al. 2021): the loader also yields two augmented
views of each image (``ssl.recipe``, one decode with the caption crop), the model runs them
through its image trunk and SSL head (``ssl.head``, ``ssl.proj_hidden``, ``ssl.proj_dim``), and
the loss adds ``ssl_weight`` x NT-Xent at ``loss.ssl_temperature`` on them
(:class:`~clipkit.losses.slip.SLIPLoss`). Evaluation and export are CLIP's.
"""

from __future__ import annotations

import math
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


def slip_views(cfg: Config) -> Any:
    """The SLIP views (a :class:`~clipkit.data.views.ViewSpec`), or None for plain CLIP."""
    if not cfg.loss.ssl_weight > 0:
        return None
    from clipkit.data.views import ViewSpec

    return ViewSpec(cfg.ssl.recipe or "slip", cfg.ssl.views)


def check_slip(cfg: Config) -> None:
    """SLIP's settings, checked before the model is built (one line each).

    Raises:
        ValueError: a negative or non-finite ``loss.ssl_weight``; with ``ssl_weight > 0``: a
            CLIP loss other than infonce / siglip, a non-positive ``loss.ssl_temperature``,
            ``ssl.views`` other than 2, head widths < 1 or an unknown ``ssl.recipe``.
    """
    w = cfg.loss.ssl_weight
    if not (w >= 0 and math.isfinite(w)):
        raise ValueError(f"loss.ssl_weight={w}: must be >= 0 (0 = CLIP, SLIP: 1.0)")
    if w == 0:
        return
    if cfg.loss.name not in ("infonce", "siglip"):
        raise ValueError(
            f"loss.name={cfg.loss.name}: SLIP (loss.ssl_weight > 0) wraps infonce or siglip"
        )
    if not (cfg.loss.ssl_temperature > 0 and math.isfinite(cfg.loss.ssl_temperature)):
        raise ValueError(
            f"loss.ssl_temperature={cfg.loss.ssl_temperature}: must be > 0 (SLIP: 0.1)"
        )
    if cfg.ssl.views != 2:
        raise ValueError(
            f"ssl.views={cfg.ssl.views}: SLIP (loss.ssl_weight > 0) takes exactly 2 views per image"
        )
    if cfg.ssl.proj_hidden < 1 or cfg.ssl.proj_dim < 1:
        raise ValueError(
            f"ssl.proj_hidden={cfg.ssl.proj_hidden}, ssl.proj_dim={cfg.ssl.proj_dim}: "
            "SLIP's head needs widths >= 1"
        )
    slip_views(cfg)  # an unknown recipe name is a ValueError listing the valid ones


class ClipTask(Task):
    """Symmetric InfoNCE (or SigLIP) between image and caption embeddings; + NT-Xent (SLIP)."""

    _log_every, _accum = 1, 1  # train.log_every, train.accum_steps: set by build_model

    def build_model(self, cfg: Config) -> nn.Module:
        from clipkit.data import DeviceNormalize

        check_slip(cfg)  # before the model: the head's shape comes from these settings
        if cfg.model.text_length_multiple < 1 or cfg.model.frozen_text_cache < 0:
            raise ValueError(
                f"model.text_length_multiple={cfg.model.text_length_multiple} must be >= 1 and "
                f"model.frozen_text_cache={cfg.model.frozen_text_cache} >= 0"
            )
        self._log_every, self._accum = cfg.train.log_every, cfg.train.accum_steps
        model = build_dual_encoder(cfg.model, cfg.loss, cfg.ssl)
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
            views=slip_views(cfg),  # SLIP: the views come with the caption crop and tokens
        )

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        image = batch["image"]  # (B, 3, S, S) uint8 from the loader: normalise on the device
        if image.dtype == torch.uint8:
            image = self._normalize(image)
        views = batch.get("views")  # SLIP: uint8 (2, B, 3, S, S)
        if views is not None:
            views = self._normalize(views)  # (2, B, 3, S, S) float
        # One call through the (possibly DDP-wrapped) forward: the scale's and the SSL head's
        # gradients are all-reduced with the towers'.
        out = model(image=image, text=batch["text"], views=views)
        extra = {}
        if views is not None:
            from clipkit.losses.slip import VIEW_KEYS

            extra = dict(zip(VIEW_KEYS, out["ssl"]))  # (B, P) each
        return Embeddings(
            q=out["image"],  # (B, D)
            k=out["text"],  # (B, D)
            logit_scale=out["logit_scale"],
            logit_bias=out.get("logit_bias"),
            extra=extra,
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

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        """``text_cache_hit_rate`` at logging steps: the share of this process's captions since
        the last log for which the locked text trunk did not run (only while the cache is used).
        """
        if step % max(1, self._log_every) and step != total_steps:
            return {}
        lookups, computed = _unwrap(model).text_cache.take_counts()
        if not lookups:
            return {}
        # GradCache (several micro-batches) looks every caption up twice: embedding and replay.
        captions = lookups / (2 if self._accum > 1 else 1)
        return {"text_cache_hit_rate": max(0.0, 1.0 - computed / captions)}

    def export(self, cfg: Config, model: nn.Module, out_dir: str) -> None:
        # The loop writes ``<output_dir>/export.tmp`` and renames it ``export``: an HF text
        # tower's config must name the final folder.
        final = Path(cfg.train.output_dir).expanduser().resolve() / "export"
        _unwrap(model).export(Path(out_dir), location=final)
