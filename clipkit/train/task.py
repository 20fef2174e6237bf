"""The contract between the one training loop and what it trains (CLIP, SimCSE, next SSL).

``train(cfg)`` in :mod:`clipkit.train.loop` is written once; a task supplies the model, the
data, how a micro-batch becomes embeddings, an input check, evaluation and export. The three
Protocols below are the whole contract; tasks are chosen by ``cfg.task`` from :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from clipkit.config.schema import Config


@dataclass
class Embeddings:
    """What :meth:`Task.embed` returns for one micro-batch: the loss's inputs, one shape.

    ``q`` and ``k`` are ``(B, D)`` rows where ``q[i]`` and ``k[i]`` are a positive pair
    (L2-normalised, except where the loss defines its own normalisation: Barlow Twins'
    projections, SwAV's prototype scores). ``logit_scale`` / ``logit_bias`` come out of the
    model's forward (so DDP all-reduces their gradients with the towers');
    ``logit_scale=None`` means the loss module's own temperature is used.

    ``extra`` holds further named inputs of the loss whose first dimension is the micro-batch's
    rows (e.g. SLIP's two image views ``(B, P)`` each, SwAV's small crops ``(B, V, K)``): GradCache
    concatenates each over micro-batches like ``q`` and ``k``, and the loop hands them to the
    loss as ``extra={name: tensor}`` (only when there are any). ``shared`` holds inputs that are
    the same for every micro-batch of a step and not per row (e.g. SwAV's queue scored by the
    current prototypes ``(2, Q, K)``): taken from the first micro-batch like the logit scale,
    and handed to the loss in the same ``extra`` dict (names must not clash).
    """

    q: torch.Tensor  # (B, D)
    k: torch.Tensor  # (B, D)
    hard_negatives: torch.Tensor | None = None  # (B * h, D)
    logit_scale: torch.Tensor | None = None  # () exponentiated
    logit_bias: torch.Tensor | None = None  # () SigLIP only
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, ...)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> any shape


@runtime_checkable
class TrainData(Protocol):
    """The training data a task hands the loop: an iterable of micro-batches.

    Each micro-batch is a dict of tensors (moved to the device by the loop) plus a ``"key"``
    list naming its samples. One pass of ``iter(data)`` is one epoch of this process's share.
    """

    num_batches: int  # micro-batches per epoch for this process (equal on every rank)
    stats: dict[str, int]  # skip counters (unreadable samples, damaged shards ...)

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def set_epoch(self, epoch: int) -> None:
        """Re-plan for ``epoch`` (shuffles are seeded from ``(seed, epoch)``)."""

    def state_dict(self) -> dict[str, Any]:
        """The exact position in the epoch, for a checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (same epoch, next unseen sample)."""


class Task(Protocol):
    """What the training loop needs from a task (tasks subclass it for the defaults)."""

    def build_model(self, cfg: Config) -> nn.Module:
        """The trainable module (owns its log-temperature when it learns one)."""

    def check_inputs(self, cfg: Config, model: nn.Module) -> None:
        """Fail in seconds, before any training, when an evaluation input is missing,
        unreadable or inconsistent (``ValueError``, one line naming the key and path)."""

    def build_train_data(
        self, cfg: Config, model: nn.Module, rank: int, world_size: int
    ) -> TrainData:
        """This process's share of the training data (see :class:`TrainData`)."""

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        """One micro-batch (already on the device) -> :class:`Embeddings`."""

    def logit_scale(self, model: nn.Module) -> torch.Tensor | None:
        """The model's exponentiated scale, or None to use the loss module's own temperature
        (used when :meth:`embed` leaves ``logit_scale`` unset)."""

    def evaluate(self, cfg: Config, model: nn.Module, accelerator: Any, step: int) -> dict:
        """Flat metrics dict at optimiser step ``step``, e.g. ``{"zeroshot/digits/acc1": 0.9}``;
        called on every rank (evaluators split the data over ranks and gather)."""

    def export(self, cfg: Config, model: nn.Module, out_dir: str) -> None:
        """Write the user-facing model format (open_clip export or sentence-transformers)."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Stateful modules beside the model, built by :meth:`build_model` (e.g. a momentum
        teacher): the loop moves them to the device and saves them in every checkpoint; they
        are not wrapped by DDP. Default: none."""
        return {}

    def before_update(self, model: nn.Module, step: int) -> None:
        """Called after the step's gradients are in ``.grad`` (all ranks) and before clipping
        and the optimiser update, with the unwrapped model and the 0-based step being taken
        (e.g. SwAV drops its prototypes' gradients for the first steps). Default: nothing."""

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        """Called after each optimiser step with the unwrapped model (e.g. the teacher's EMA
        update); returns scalars to log. Default: nothing."""
        return {}


def _clip() -> Task:
    from clipkit.train.clip_task import ClipTask

    return ClipTask()


def _simcse() -> Task:
    from clipkit.train.simcse_task import SimCSETask

    return SimCSETask()


def _simclr() -> Task:
    from clipkit.train.ssl_task import SimCLRTask

    return SimCLRTask()


def _moco() -> Task:
    from clipkit.train.ssl_task import MoCoTask

    return MoCoTask()


def _byol() -> Task:
    from clipkit.train.ssl_task import BYOLTask

    return BYOLTask()


def _barlow_twins() -> Task:
    from clipkit.train.ssl_task import BarlowTwinsTask

    return BarlowTwinsTask()


def _swav() -> Task:
    from clipkit.train.ssl_task import SwAVTask

    return SwAVTask()


# Name -> factory; factories import lazily so a task's heavy dependencies load only when used.
TASKS: dict[str, Callable[[], Task]] = {
    "clip": _clip,
    "simcse": _simcse,
    "simclr": _simclr,
    "moco": _moco,
    "byol": _byol,
    "barlow_twins": _barlow_twins,
    "swav": _swav,
}


def get_task(name: str) -> Task:
    """Look a task up by name in :data:`TASKS`.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; valid: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Embeddings", "Task", "TrainData", "get_task"]
