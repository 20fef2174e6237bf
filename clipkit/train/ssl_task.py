"""Image self-supervision tasks on the one loop: SimCLR, MoCo, BYOL, Barlow Twins, SwAV.

All read image-only data as V >= 2 augmented uint8 views per image (:mod:`clipkit.data.views`),
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
* ``task=byol`` (Grill et al. 2020): the student's predictions regress the momentum teacher's
  projections of the other view (``loss.name=byol``); no negatives.
* ``task=barlow_twins`` (Zbontar et al. 2021): the two views' raw projections' cross-correlation
  over the global batch is pushed to the identity (``loss.name=barlow_twins``).
* ``task=swav`` (Caron et al. 2020): prototype scores predict the other views' Sinkhorn codes
  (``loss.name=swav``); prototypes frozen for the first steps, unit-norm after each.

Every task logs the spread of its projections (``train/proj_spread``) and warns once when it
falls below ``ssl.collapse_threshold`` (the collapse guard).

Evaluation is the weighted kNN of :mod:`clipkit.eval` on backbone features (``eval.knn`` with
``eval.knn_train``); export is the student's ``ssl_config.json`` + weights (plus the teacher).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clipkit.config.schema import Config
from clipkit.losses.queue import SwAVQueue
from clipkit.models.ssl import SSLModel
from clipkit.train.task import Embeddings, Task, TrainData

if TYPE_CHECKING:
    from clipkit.data.views import ViewRecipe

# task -> (default head, default view recipe, loss names it trains with)
DEFAULTS = {
    "simclr": ("simclr", "simclr", ("nt_xent",)),
    "moco": ("moco_v2", "moco_v2", ("moco",)),
    "moco_v3": ("moco_v3", "byol", ("moco_v3",)),  # v3 uses BYOL's asymmetric augmentations
    "byol": ("byol", "byol", ("byol",)),
    "barlow_twins": ("barlow_twins", "byol", ("barlow_twins",)),  # BYOL's views (paper, App.)
    "swav": ("swav", "swav", ("swav",)),
}


def _unwrap(model: nn.Module) -> SSLModel:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


class _ImageSSLTask(Task):
    """What every image-SSL task shares: the model, the views, normalisation, the collapse
    guard, kNN, export."""

    name = ""

    # --------------------------------------------------------------- model and data
    def variant(self, cfg: Config) -> str:
        """The key of :data:`DEFAULTS` this run follows."""
        return self.name

    def head(self, cfg: Config) -> str:
        return cfg.ssl.head or DEFAULTS[self.variant(cfg)][0]

    def recipe(self, cfg: Config) -> str:
        return cfg.ssl.recipe or DEFAULTS[self.variant(cfg)][1]

    def view_recipes(self, cfg: Config) -> tuple[ViewRecipe, ...]:
        """The recipe's views, their blur per ``ssl.blur_kernel`` (-1: the recipe's own)."""
        from dataclasses import replace

        from clipkit.data.views import RECIPES

        name = self.recipe(cfg)
        if name not in RECIPES:
            raise ValueError(f"ssl.recipe={name!r}; valid: {', '.join(sorted(RECIPES))}")
        k = cfg.ssl.blur_kernel
        if k == -1:
            return RECIPES[name]
        if k < 0:
            raise ValueError(f"ssl.blur_kernel={k}: -1 (the recipe's), 0 (PIL radius) or > 0")
        return tuple(replace(r, blur_kernel=k) for r in RECIPES[name])

    def build_model(self, cfg: Config) -> nn.Module:
        """An :class:`SSLModel` per ``ssl.*``."""
        from clipkit.data import DeviceNormalize

        s = cfg.ssl
        head = self.head(cfg)
        if head == "swav" and s.prototypes < 1:
            raise ValueError(f"ssl.prototypes={s.prototypes}: SwAV needs >= 1 (paper: 3000)")
        model = SSLModel(
            s.backbone,
            head,
            s.proj_hidden,
            s.proj_dim,
            cifar_stem=s.cifar_stem,
            image_size=s.image_size,
            prototypes=s.prototypes if head == "swav" else 0,
        )
        self._normalize = DeviceNormalize(model.mean, model.std)
        self._collapse_threshold = s.collapse_threshold
        self._spread: torch.Tensor | None = None
        self._collapsed = False
        return model

    def check_inputs(self, cfg: Config, model: nn.Module) -> None:
        """Views, loss and kNN sets fit the task (one line each, before any step)."""
        if cfg.ssl.views < 2:
            raise ValueError(f"ssl.views={cfg.ssl.views}: {self.name} needs at least 2 views")
        self.view_recipes(cfg)  # an unknown recipe or a bad ssl.blur_kernel fails now
        # Only SwAV uses more than two views; elsewhere they would be decoded and dropped.
        if self.name != "swav" and (cfg.ssl.views > 2 or cfg.ssl.small_views):
            raise ValueError(
                f"ssl.views={cfg.ssl.views}, ssl.small_views={cfg.ssl.small_views}: task="
                f"{self.name} trains on 2 views (more views and small crops: task=swav)"
            )
        if len(cfg.ssl.small_scale) != 2:
            raise ValueError(f"ssl.small_scale={cfg.ssl.small_scale}: give [min, max]")
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
            views=ViewSpec(
                self.view_recipes(cfg),
                cfg.ssl.views,
                name=self.recipe(cfg),
                small_views=cfg.ssl.small_views,
                small_size=cfg.ssl.small_size,
                small_scale=(cfg.ssl.small_scale[0], cfg.ssl.small_scale[1]),
            ),
        )

    def _pair(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's first two views, normalised on the device: ``(B, 3, S, S)`` each."""
        x = self._normalize(batch["views"][:2])  # (2, B, 3, S, S) from uint8 (V, B, 3, S, S)
        return x[0], x[1]

    def logit_scale(self, model: nn.Module) -> torch.Tensor | None:
        """None: the loss module's fixed temperature (``loss.temperature``)."""
        return None

    # --------------------------------------------------------------- collapse guard
    def watch(self, z: torch.Tensor) -> torch.Tensor:
        """Remember the spread of projections ``z (B, P)`` for the collapse guard; returns z.

        Spread = mean over dimensions of the batch std of the L2-normalised rows, times
        ``sqrt(P)``: about 1 for rows spread uniformly on the sphere, 0 when every image maps
        to the same point (complete collapse) -- the measure lightly and solo-learn log.
        """
        with torch.no_grad():
            u = torch.nn.functional.normalize(z.detach().float(), dim=-1)  # (B, P)
            self._spread = u.std(dim=0).mean() * u.shape[1] ** 0.5
        return z

    def collapse_logs(self, step: int) -> dict[str, float]:
        """``{"proj_spread": value}`` and one warning line when it falls below
        ``ssl.collapse_threshold`` (again only after it has recovered)."""
        if self._spread is None:
            return {}
        spread = float(self._spread)
        low = spread < self._collapse_threshold
        if low and not self._collapsed:
            from accelerate import PartialState

            if PartialState().is_main_process:
                print(
                    f"warning: step {step}: representation collapse? projection spread "
                    f"{spread:.4f} < ssl.collapse_threshold={self._collapse_threshold:g} "
                    "(std of normalised projections x sqrt(dim); 1 = spread, 0 = collapsed)",
                    flush=True,
                )
        self._collapsed = low
        return {"proj_spread": spread}

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        return self.collapse_logs(step)

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
        return Embeddings(q=self.watch(model(x1)), k=model(x2))  # (B, P) each, L2-normalised


class _MomentumTask(_ImageSSLTask):
    """A task with a momentum teacher (MoCo, BYOL): an EMA copy of the student, made before
    DDP wraps it, moved, checkpointed and exported by the loop, updated after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher: nn.Module | None = None

    def build_model(self, cfg: Config) -> nn.Module:
        """The student, and its momentum teacher (``ssl.momentum`` -> ``ssl.momentum_final``)."""
        from clipkit.losses.teacher import MomentumTeacher

        student = super().build_model(cfg)
        self.teacher = MomentumTeacher(student, cfg.ssl.momentum, cfg.ssl.momentum_final)
        return student

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def targets(self, model: nn.Module, *views: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's projections of ``views``, in the student's mode (BN on batch
        statistics while training)."""
        assert self.teacher is not None, "build_model first"
        self.teacher.train(model.training)
        return [self.teacher(x) for x in views]

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        assert self.teacher is not None
        logs = {"teacher_momentum": self.teacher.update(model, step, total_steps)}
        return {**logs, **super().after_step(model, step, total_steps)}


class MoCoTask(_MomentumTask):
    """MoCo v2 (student queries, momentum-teacher keys, a queue of past keys as negatives) or
    v3 (``ssl.moco_version=3``: queries through a predictor, in-batch keys of every rank as
    negatives, no queue; ``loss.name=moco_v3``)."""

    name = "moco"

    def variant(self, cfg: Config) -> str:
        return "moco_v3" if cfg.ssl.moco_version == 3 else "moco"

    def __init__(self) -> None:
        super().__init__()
        self.version = 2

    def build_model(self, cfg: Config) -> nn.Module:
        """The student and its momentum teacher."""
        if cfg.ssl.moco_version not in (2, 3):
            raise ValueError(f"ssl.moco_version={cfg.ssl.moco_version}; valid: 2, 3")
        self.version = cfg.ssl.moco_version
        return super().build_model(cfg)

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

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        x1, x2 = self._pair(batch)
        k1, k2 = self.targets(model, x1, x2)  # (B, P) each
        if self.version == 3:
            # Rows interleaved per image (view 1, view 2) so micro-batches concatenate safely.
            q = torch.stack([model(x1, predict=True), model(x2, predict=True)], 1)  # (B, 2, P)
            k = torch.stack([k1, k2], 1)  # (B, 2, P)
            return Embeddings(q=self.watch(q.flatten(0, 1)), k=k.flatten(0, 1))  # (2B, P) each
        # Rows interleaved per image (view-1 query, view-2 query; keys: each one's pair), so
        # micro-batches concatenate safely and loss.moco_push=direction finds its directions.
        q = torch.stack([model(x1), model(x2)], 1).flatten(0, 1)  # (2B, P) student queries
        return Embeddings(q=self.watch(q), k=torch.stack([k2, k1], 1).flatten(0, 1))


class BYOLTask(_MomentumTask):
    """BYOL (Grill et al. 2020): the student's predictions regress the momentum teacher's
    projections of the other view (``loss.name=byol``: negative cosine similarity), symmetrised
    over the two views; no negatives. The teacher's momentum rises from ``ssl.momentum`` (0.99)
    to 1 on a cosine schedule; views are BYOL's asymmetric pair (``ssl.recipe=byol``)."""

    name = "byol"

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        x1, x2 = self._pair(batch)
        t1, t2 = self.targets(model, x1, x2)  # (B, P) each, no gradient
        p = torch.cat([model(x1, predict=True), model(x2, predict=True)])  # (2B, P)
        # Each prediction regresses the other view's target; the guard watches the predictions
        # (the projections themselves with ssl.head=byol_nopred, the collapsing ablation).
        return Embeddings(q=self.watch(p), k=torch.cat([t2, t1]))


class BarlowTwinsTask(_ImageSSLTask):
    """Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' raw
    projections, standardised over the global batch, is pushed to the identity
    (``loss.name=barlow_twins``); a wide projector (``ssl.proj_hidden = ssl.proj_dim``)."""

    name = "barlow_twins"

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        x1, x2 = self._pair(batch)
        z1 = model(x1, normalize=False)  # (B, P) raw: the loss standardises over the batch
        return Embeddings(q=self.watch(z1), k=model(x2, normalize=False))


class SwAVTask(_ImageSSLTask):
    """SwAV (Caron et al. 2020): each view's prototype scores predict the Sinkhorn codes of the
    other high-resolution views (``loss.name=swav``). Views 1-2 are the high-resolution crops;
    further views (``ssl.views > 2``) and the multi-crop's small crops (``ssl.small_views`` at
    ``ssl.small_size`` px) are predicted but give no codes (``extra["low_res"]``). The
    prototypes are unit-norm after every step and frozen for the first
    ``ssl.freeze_prototypes_steps`` steps."""

    name = "swav"

    def __init__(self) -> None:
        super().__init__()
        self.queue: SwAVQueue | None = None

    def build_model(self, cfg: Config) -> nn.Module:
        """The student; with ``ssl.queue_size`` also this rank's queue (checkpointed, not DDP)."""
        self._freeze_steps = cfg.ssl.freeze_prototypes_steps
        if cfg.ssl.queue_size < 0 or cfg.ssl.queue_start_steps < 0:
            raise ValueError(
                f"ssl.queue_size={cfg.ssl.queue_size}, ssl.queue_start_steps="
                f"{cfg.ssl.queue_start_steps}: both must be >= 0"
            )
        if cfg.ssl.queue_size:
            self.queue = SwAVQueue(cfg.ssl.queue_size, cfg.ssl.queue_start_steps)
        return super().build_model(cfg)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"swav_queue": self.queue} if self.queue is not None else {}

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        views = self._normalize(batch["views"])  # (V, B, 3, S, S) from uint8
        if self.queue is None:
            s1 = model(views[0], scores=True)  # (B, K)
            s2 = model(views[1], scores=True)  # (B, K)
        else:
            s1, u1 = model(views[0], scores=True, with_projection=True)  # (B, K), (B, P)
            s2, u2 = model(views[1], scores=True, with_projection=True)
            self.queue.remember(u1, u2)
        # The guard watches the scores: the projections collapse iff their scores do.
        out = Embeddings(q=self.watch(s1), k=s2)
        if self.queue is not None:
            scores = self.queue.scores(_unwrap(model).prototypes.weight)  # (2, Q, K) or None
            if scores is not None:
                out.shared["queue"] = scores
        # Further views at full size, then the small crops (their own side): predicted only.
        low = [model(v, scores=True) for v in views[2:]]  # (B, K) each
        if "small_views" in batch:
            small = self._normalize(batch["small_views"])  # (V_small, B, 3, s, s)
            low += [model(v, scores=True) for v in small]
        if low:
            out.extra["low_res"] = torch.stack(low, 1)  # (B, V - 2 + V_small, K)
        return out

    def before_update(self, model: nn.Module, step: int) -> None:
        """Drop the prototypes' gradients while they are frozen (no update, no weight decay)."""
        proto = _unwrap(model).prototypes
        if proto is not None and step < self._freeze_steps:
            proto.weight.grad = None

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        _unwrap(model).normalize_prototypes_()
        logs = super().after_step(model, step, total_steps)
        if self.queue is not None:
            logs["swav_queue_filled"] = float(self.queue.step())
        return logs


__all__ = ["BYOLTask", "BarlowTwinsTask", "MoCoTask", "SimCLRTask", "SwAVTask"]
