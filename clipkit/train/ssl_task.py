"""Image self-supervision tasks on the one loop: SimCLR and MoCo.

Both read image-only data as V >= 2 augmented uint8 views per image (:mod:`clipkit.data.views`),
normalised on the device, and train an :class:`~clipkit.models.ssl.SSLModel` (backbone +
projection head) with a loss from the one registry (``loss.name``):

* ``task=simclr`` (Chen et al. 2020): both views through the student; NT-Xent over the 2N views
  (``loss.name=nt_xent``, ``loss.temperature`` 0.5 in the shipped config).
* ``task=moco`` v2 (Chen et al. 2020, "Improved baselines"): queries from the student, keys
  from a momentum teacher (:class:`~clipkit.losses.teacher.MomentumTeacher`), negatives from a
  queue of past keys of every rank (``loss.name=moco``, ``loss.queue_size``). The loss is
  symmetrised (each view is a query once), as lightly's and MoCo's own CIFAR-10 recipes do.
  ``ssl.moco_version=3`` (Chen, Xie, He 2021): a predictor on the student, in-batch keys of
  every rank as negatives, no queue (``loss.name=moco_v3``).

Evaluation is the weighted kNN of :mod:`clipkit.eval` on backbone features (``eval.knn`` with
``eval.knn_train``); export is the student's ``ssl_config.json`` + weights (plus the teacher).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipkit.config.schema import Config
from clipkit.models.ssl import SSLModel
from clipkit.train.task import Embeddings, Task, TrainData

# task -> (default head, default view recipe, loss names it trains with)
DEFAULTS = {
    "simclr": ("simclr", "simclr", ("nt_xent",)),
    "moco": ("moco_v2", "moco_v2", ("moco",)),
    "moco_v3": ("moco_v3", "byol", ("moco_v3",)),  # v3 uses BYOL's asymmetric augmentations
}


def _unwrap(model: nn.Module) -> SSLModel:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


class _ImageSSLTask(Task):
    """What SimCLR and MoCo share: the model, the views, normalisation, kNN, export."""

    name = ""

    # --------------------------------------------------------------- model and data
    def variant(self, cfg: Config) -> str:
        """The key of :data:`DEFAULTS` this run follows."""
        return self.name

    def head(self, cfg: Config) -> str:
        return cfg.ssl.head or DEFAULTS[self.variant(cfg)][0]

    def recipe(self, cfg: Config) -> str:
        return cfg.ssl.recipe or DEFAULTS[self.variant(cfg)][1]

    def build_model(self, cfg: Config) -> nn.Module:
        """An :class:`SSLModel` per ``ssl.*``."""
        from clipkit.data import DeviceNormalize

        s = cfg.ssl
        model = SSLModel(
            s.backbone,
            self.head(cfg),
            s.proj_hidden,
            s.proj_dim,
            cifar_stem=s.cifar_stem,
            image_size=s.image_size,
        )
        self._normalize = DeviceNormalize(model.mean, model.std)
        return model

    def check_inputs(self, cfg: Config, model: nn.Module) -> None:
        """Views, loss and kNN sets fit the task (one line each, before any step)."""
        if cfg.ssl.views < 2:
            raise ValueError(f"ssl.views={cfg.ssl.views}: {self.name} needs at least 2 views")
        losses = DEFAULTS[self.variant(cfg)][2]
        if cfg.loss.name not in losses:
            what = self.variant(cfg).replace("moco_v3", "moco with ssl.moco_version=3")
            raise ValueError(
                f"loss.name={cfg.loss.name}: task={what} trains with {' or '.join(losses)}"
            )
        from clipkit.train.evaluation import check_knn_inputs

        check_knn_inputs(cfg, _unwrap(model))

    def build_train_data(
        self, cfg: Config, model: nn.Module, rank: int, world_size: int
    ) -> TrainData:
        """``data.train`` (image-only input is valid) as V uint8 views per image."""
        from clipkit.data import build_train_loader
        from clipkit.data.views import ViewSpec

        if not cfg.data.train:
            raise ValueError(
                "data.train is empty: give image data, e.g. "
                "data.train=../shared/data/cifar10/train.tar"
            )
        m = _unwrap(model)
        return build_train_loader(
            cfg.data,
            tokenizer=None,
            image_size=m.image_size,
            mean=m.mean,
            std=m.std,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world_size,
            views=ViewSpec(self.recipe(cfg), cfg.ssl.views),
        )

    def _pair(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's first two views, normalised on the device: ``(B, 3, S, S)`` each."""
        x = self._normalize(batch["views"][:2])  # (2, B, 3, S, S) from uint8 (V, B, 3, S, S)
        return x[0], x[1]

    def logit_scale(self, model: nn.Module) -> torch.Tensor | None:
        """None: the loss module's fixed temperature (``loss.temperature``)."""
        return None

    # --------------------------------------------------------------- evaluation, export
    def evaluate(
        self, cfg: Config, model: nn.Module, accelerator: Any, step: int
    ) -> dict[str, float]:
        """Weighted kNN top-1/top-5 of backbone features (``eval.knn`` / ``eval.knn_train``)."""
        from clipkit.train.evaluation import evaluate_knn

        return evaluate_knn(cfg, _unwrap(model), accelerator)

    def export(self, cfg: Config, model: nn.Module, out_dir: str) -> None:
        _unwrap(model).export(Path(out_dir), extra=self.extra_modules())


class SimCLRTask(_ImageSSLTask):
    """SimCLR: two views through one network, NT-Xent over the 2N projections."""

    name = "simclr"

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        x1, x2 = self._pair(batch)
        # Each view through its own forward (BN statistics per view, as the reference recipes).
        return Embeddings(q=model(x1), k=model(x2))  # (B, P) each, L2-normalised


class MoCoTask(_ImageSSLTask):
    """MoCo v2 (student queries, momentum-teacher keys, a queue of past keys as negatives) or
    v3 (``ssl.moco_version=3``: queries through a predictor, in-batch keys of every rank as
    negatives, no queue; ``loss.name=moco_v3``)."""

    name = "moco"

    def variant(self, cfg: Config) -> str:
        return "moco_v3" if cfg.ssl.moco_version == 3 else "moco"

    def __init__(self) -> None:
        super().__init__()
        self.teacher: nn.Module | None = None
        self.version = 2

    def build_model(self, cfg: Config) -> nn.Module:
        """The student, and its momentum teacher (a copy made before DDP wraps the student)."""
        from clipkit.losses.teacher import MomentumTeacher

        if cfg.ssl.moco_version not in (2, 3):
            raise ValueError(f"ssl.moco_version={cfg.ssl.moco_version}; valid: 2, 3")
        self.version = cfg.ssl.moco_version
        student = super().build_model(cfg)
        self.teacher = MomentumTeacher(student, cfg.ssl.momentum, cfg.ssl.momentum_final)
        return student

    def check_inputs(self, cfg: Config, model: nn.Module) -> None:
        """As every SSL task, plus a queue that holds whole steps of keys (checked now, not at
        the first step)."""
        super().check_inputs(cfg, model)
        if cfg.ssl.moco_version == 3:
            if _unwrap(model).predictor is None:
                raise ValueError(f"ssl.head={self.head(cfg)}: MoCo v3 needs a predictor (moco_v3)")
            return
        from accelerate import PartialState

        from clipkit.losses.moco import check_queue_size

        # Both views are queries (symmetrised loss): 2 keys per image, every process and
        # micro-batch of the step.
        world = PartialState().num_processes
        check_queue_size(
            cfg.loss.queue_size, 2 * cfg.train.batch_size * cfg.train.accum_steps * world
        )

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        assert self.teacher is not None, "build_model first"
        x1, x2 = self._pair(batch)
        # The teacher runs in the student's mode (BN on batch statistics while training).
        self.teacher.train(model.training)
        if self.version == 3:
            # Rows interleaved per image (view 1, view 2) so micro-batches concatenate safely.
            q = torch.stack([model(x1, predict=True), model(x2, predict=True)], 1)  # (B, 2, P)
            k = torch.stack([self.teacher(x1), self.teacher(x2)], 1)  # (B, 2, P)
            return Embeddings(q=q.flatten(0, 1), k=k.flatten(0, 1))  # (2B, P) each
        q = torch.cat([model(x1), model(x2)])  # (2B, P) student queries
        k = torch.cat([self.teacher(x2), self.teacher(x1)])  # (2B, P) keys: each view's pair
        return Embeddings(q=q, k=k)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        assert self.teacher is not None
        return {"teacher_momentum": self.teacher.update(model, step, total_steps)}


__all__ = ["MoCoTask", "SimCLRTask"]
