"""The contract between the one training loop and what it trains (CLIP or SimCSE).

``train(cfg)`` in :mod:`clipkit.train.loop` is written once; a task supplies the model, the
data, how a batch becomes embeddings, evaluation and export. Tasks are chosen by ``cfg.task``
from :data:`TASKS`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from clipkit.config.schema import Config


class Task(Protocol):
    """What the training loop needs from a task."""

    def build_model(self, cfg: Config) -> nn.Module:
        """The trainable module (owns its log-temperature when it learns one)."""

    def build_train_data(self, cfg: Config, model: nn.Module, rank: int, world_size: int) -> Any:
        """An iterable of micro-batches (dicts of tensors + ``"key"`` list) with
        ``state_dict()``/``load_state_dict()`` for exact resume and ``set_epoch(epoch)``."""

    def embed(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | dict[str, Any]:
        """Micro-batch -> ``(q (B, D), k (B, D), hard_negatives (B*h, D) | None)``, normalised,
        or a dict with those keys plus ``logit_scale``/``logit_bias`` taken from the model's
        forward (so DDP all-reduces their gradients with the towers')."""

    def logit_scale(self, model: nn.Module) -> torch.Tensor | None:
        """The model's exponentiated scale, or None to use the loss module's own temperature."""

    def evaluate(self, cfg: Config, model: nn.Module, accelerator: Any) -> dict[str, float]:
        """Flat metrics dict, e.g. ``{"zeroshot/digits/acc1": 0.9}``; run on every rank."""

    def export(self, cfg: Config, model: nn.Module, out_dir: str) -> None:
        """Write the user-facing model format (open_clip export or sentence-transformers)."""


def get_task(name: str) -> Task:
    """Look a task up by name; unknown names list the valid ones."""
    if name == "clip":
        from clipkit.train.clip_task import ClipTask

        return ClipTask()
    if name == "simcse":
        from clipkit.train.simcse_task import SimCSETask

        return SimCSETask()
    raise ValueError(f"unknown task '{name}'; valid: clip, simcse")


__all__ = ["Task", "get_task"]
