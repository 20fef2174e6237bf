"""Registry modules of the losses without a temperature to learn: Barlow Twins, BYOL, SwAV.

They share the contrastive modules' call (``forward(q, k, *, ..., extra=None)``, built by name
from :data:`clipkit.losses.module.LOSSES`) and their distributed rule (N processes = one process
with the global batch), but hold no scale, no negatives and no queue of their own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipkit.config.schema import LossConfig
from clipkit.losses.barlow_twins import barlow_twins_loss
from clipkit.losses.byol import negative_cosine_rows
from clipkit.losses.dist import all_gather_with_grad, gather_sizes, world
from clipkit.losses.infonce import check_pair
from clipkit.losses.swav import check_swav_options, swav_rows


class NonContrastiveLoss(nn.Module):
    """Base of Barlow Twins, BYOL and SwAV: no learnable scale, no negatives.

    The loop's per-step :meth:`clamp_` is a no-op; the contrastive inputs (hard negatives, the
    model's logit scale and bias) and ``extra`` tensors the loss does not read are errors.
    Distributed: the row-separable losses (BYOL, SwAV) return ``W / N_global`` x the sum of
    their own rows, as the module docstring says; Barlow Twins returns the global loss itself
    (see :class:`BarlowTwinsLoss`).
    """

    name = ""
    extra_names: frozenset[str] = frozenset()

    def clamp_(self) -> None:
        """Nothing to clamp (the loop calls this on every loss after each optimiser step)."""

    def _inputs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        hard_negatives: torch.Tensor | None,
        logit_scale: torch.Tensor | None,
        logit_bias: torch.Tensor | None,
        extra: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """Check what the loop passes; returns ``extra`` as a dict (empty when None)."""
        unused = {"hard negatives": hard_negatives, "logit_scale": logit_scale}
        unused["logit_bias"] = logit_bias
        for what, t in unused.items():
            if t is not None:
                raise ValueError(f"loss.name={self.name} takes no {what}")
        extra = dict(extra or {})
        unknown = sorted(set(extra) - self.extra_names)
        if unknown:
            valid = ", ".join(sorted(self.extra_names)) or "none"
            raise ValueError(
                f"loss.name={self.name}: unknown extra inputs {unknown}; valid: {valid}"
            )
        check_pair(q, k, {})
        return extra

    @staticmethod
    def _no_queue(cfg: LossConfig) -> None:
        if cfg.queue_size:
            raise ValueError(f"loss.queue_size applies to infonce, siglip and moco, not {cfg.name}")


def _rank_share(rows: torch.Tensor) -> torch.Tensor:
    """Mean of a row-separable loss's rows ``(n,)``; with ``W`` processes ``W / N_global`` x their
    sum (the module docstring's normalisation: exact after the gather's sum and DDP's mean)."""
    _, w = world()
    if w == 1:
        return rows.mean()
    return rows.sum() * (w / sum(gather_sizes(rows.shape[0], rows.device)))


class BarlowTwinsLoss(NonContrastiveLoss):
    """Barlow Twins (:func:`clipkit.losses.barlow_twins_loss`) over the global batch.

    ``forward(q, k)`` takes the two views' *raw* projections ``(n, D)`` (the loss standardises
    them; L2-normalised rows would change its value). The loss is not row-separable: the batch
    mean and variance and the ``D x D`` cross-correlation are taken over the whole global batch,
    never per process. With ``W > 1`` processes both views of every rank are gathered with
    gradient (one all-gather of ``[q, k]``, ranks may hold different ``n``) and *every rank
    returns the full global loss* ``L``. Why that is exact (:mod:`clipkit.losses.dist`): the
    gather's backward sums over ranks what each rank's loss sends to a shard; all ``W`` ranks
    send the same ``dL/dz``, so each shard receives ``W dL/dz_shard``, and DDP's average over
    ``W`` ranks leaves exactly the one-process gradient (``W`` copies x ``1/W``); the mean of
    the ranks' values is ``L``. Each rank builds the ``D x D`` matrix of the whole batch.

    Args:
        lambd: weight of the off-diagonal (redundancy-reduction) term (paper: 5e-3).

    Raises:
        ValueError: a negative or non-finite ``lambd``.
    """

    name = "barlow_twins"

    def __init__(self, lambd: float = 5e-3) -> None:
        super().__init__()
        if not (lambd >= 0 and math.isfinite(lambd)):
            raise ValueError(f"loss.barlow_lambda must be finite and >= 0, got {lambd}")
        self.lambd = float(lambd)

    @classmethod
    def from_config(cls, cfg: LossConfig) -> BarlowTwinsLoss:
        """``loss.barlow_lambda``; no queue."""
        cls._no_queue(cfg)
        return cls(cfg.barlow_lambda)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        hard_negatives: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Global-batch Barlow Twins loss of views ``q (n, D)`` and ``k (n, D)``.

        Raises:
            ValueError: shapes, a global batch of fewer than 2 rows, contrastive inputs.
        """
        self._inputs(q, k, hard_negatives, logit_scale, logit_bias, extra)
        if world()[1] > 1:
            d = q.shape[1]
            both, _ = all_gather_with_grad(torch.cat([q, k.to(q.dtype)], 1))  # (N, 2D)
            q, k = both[:, :d], both[:, d:]  # (N, D) each, every rank's rows in rank order
        return barlow_twins_loss(q, k, self.lambd)


class BYOLLoss(NonContrastiveLoss):
    """BYOL's loss as lightly's BYOL example uses it (:func:`clipkit.losses.negative_cosine`).

    ``forward(q, k)``: the online network's predictions ``q (n, D)`` and the targets
    ``k (n, D)``, detached by the task (the teacher runs without gradient); the task symmetrises
    by concatenating both directions' rows. Row-separable: no gather, only the row counts.
    """

    name = "byol"

    @classmethod
    def from_config(cls, cfg: LossConfig) -> BYOLLoss:
        """No settings; no queue."""
        cls._no_queue(cfg)
        return cls()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        hard_negatives: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``-mean cos(q_i, k_i)``; ``W / N_global`` x the local sum with ``W`` processes."""
        self._inputs(q, k, hard_negatives, logit_scale, logit_bias, extra)
        return _rank_share(negative_cosine_rows(q, k))


class SwAVLoss(NonContrastiveLoss):
    """SwAV's swapped prediction (:func:`clipkit.losses.swav_loss`), Sinkhorn over all ranks.

    ``forward(q, k, extra={"low_res": ...})``: ``q``, ``k`` are the prototype scores ``(n, K)``
    of the two high-resolution crops; ``extra["low_res"]`` (optional) the scores of the
    low-resolution crops ``(n, V_lo, K)``, rows first so GradCache concatenates micro-batches.
    The codes come from Sinkhorn-Knopp over every rank's rows (column sums all-reduced), so they
    equal one process's codes of the global batch for any shard sizes; they carry no gradient.
    The loss is then row-separable: ``W / N_global`` x the local rows' sum.

    Queue (SwAV's option for small batches): the queued features and the prototypes are the
    task's state, so the task scores its queue with the current prototypes and hands the
    scores over as ``extra["queue"]`` ``(2, Q, K)`` (a step-wide input:
    ``Embeddings.shared``); they join the Sinkhorn rows of their crop (each rank its own
    queue, as the paper's code) and carry no gradient.

    Args:
        temperature: softmax temperature of the predictions (SwAV: 0.1), fixed.
        sinkhorn_epsilon: Sinkhorn entropy regularisation (SwAV: 0.05).
        sinkhorn_iterations: Sinkhorn iterations (SwAV: 3).

    Raises:
        ValueError: non-positive temperature or epsilon, iterations < 1.
    """

    name = "swav"
    extra_names = frozenset({"low_res", "queue"})

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        check_swav_options(temperature, sinkhorn_epsilon, sinkhorn_iterations)
        self.temperature = float(temperature)
        self.epsilon = float(sinkhorn_epsilon)
        self.iterations = int(sinkhorn_iterations)

    @classmethod
    def from_config(cls, cfg: LossConfig) -> SwAVLoss:
        """``loss.temperature`` (fixed), ``loss.sinkhorn_epsilon``, ``loss.sinkhorn_iterations``."""
        cls._no_queue(cfg)
        if cfg.learnable_temperature:
            raise ValueError(
                "loss.name=swav has a fixed temperature (loss.temperature, SwAV: 0.1); "
                "set loss.learnable_temperature=false"
            )
        return cls(
            cfg.temperature,
            sinkhorn_epsilon=cfg.sinkhorn_epsilon,
            sinkhorn_iterations=cfg.sinkhorn_iterations,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        hard_negatives: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """SwAV loss of the high-resolution scores ``q``, ``k`` ``(n, K)``, ``extra``'s
        ``low_res`` ``(n, V_lo, K)`` and ``queue`` ``(2, Q, K)``.

        Raises:
            ValueError: shapes, unknown extra inputs, contrastive inputs.
        """
        extra = self._inputs(q, k, hard_negatives, logit_scale, logit_bias, extra)
        low = extra.get("low_res")
        if low is not None and (low.dim() != 3 or low.shape[0] != q.shape[0]):
            raise ValueError(
                f"swav extra['low_res'] must be (n, V_lo, K) with n={q.shape[0]}, "
                f"got {tuple(low.shape)}"
            )
        queue = extra.get("queue")
        if queue is not None:
            if queue.dim() != 3 or queue.shape[0] != 2 or queue.shape[2] != q.shape[1]:
                raise ValueError(
                    f"swav extra['queue'] must be (2, Q, K={q.shape[1]}), got {tuple(queue.shape)}"
                )
            queue = [queue[0].detach(), queue[1].detach()]  # (Q, K) each: codes only
        rows = swav_rows(
            [q, k],
            None if low is None else low.transpose(0, 1),  # (V_lo, n, K)
            queue=queue,
            temperature=self.temperature,
            epsilon=self.epsilon,
            iterations=self.iterations,
            all_ranks=True,
        )  # (n,)
        return _rank_share(rows)
