"""``ContrastiveLoss`` modules (temperature, distributed gather, queue) and their registry.

Distributed normalisation: on ``W`` processes each rank returns ``W / N_global`` times the sum
of its own rows' (and positive columns') losses. The all-gather's backward sums what every
rank's loss sends to each shard, and DDP then averages the ``W`` ranks' gradients: the result
is exactly the gradient of one process holding the whole global batch. With equal shards the
value a rank returns is the mean over its own rows, and the mean over ranks is the global loss.
There is no flag to get this wrong: with ``world_size > 1`` the module always gathers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.config.schema import LossConfig
from clipkit.losses.dist import all_gather_with_grad, average_grad, gather_sizes, world
from clipkit.losses.infonce import check_pair, info_nce, info_nce_sharded
from clipkit.losses.moco import check_queue_size, moco_rows
from clipkit.losses.noncontrastive import BarlowTwinsLoss, BYOLLoss, SwAVLoss
from clipkit.losses.ntxent import nt_xent_scaled, nt_xent_sharded, unit
from clipkit.losses.queue import NegativeQueue
from clipkit.losses.siglip import siglip_loss, siglip_sharded


class ContrastiveLoss(nn.Module):
    """Base: holds the (learnable or fixed) log-scale, the optional queue, and the gather.

    Args:
        init_scale: initial multiplier ``1 / temperature``.
        learnable: learn ``log(scale)`` (a parameter) or keep it fixed (a buffer).
        max_logit_scale: :meth:`clamp_` caps the scale here (CLIP: 100).
        chunk_size: tile edge; 0 = default.
        queue_size: MoCo FIFO of past keys used as extra negatives while training; 0 = off.

    Raises:
        ValueError: non-positive scale, bad clamp, chunk or queue size.
    """

    def __init__(
        self,
        init_scale: float,
        *,
        learnable: bool = True,
        max_logit_scale: float = 100.0,
        chunk_size: int = 0,
        queue_size: int = 0,
    ) -> None:
        super().__init__()
        if not init_scale > 0 or not math.isfinite(init_scale):
            raise ValueError(f"logit scale (1/temperature) must be > 0, got {init_scale}")
        if not max_logit_scale >= 1:
            raise ValueError(f"loss.max_logit_scale must be >= 1, got {max_logit_scale}")
        if learnable and init_scale > max_logit_scale:
            raise ValueError(
                f"initial logit scale {init_scale:g} exceeds loss.max_logit_scale="
                f"{max_logit_scale:g}; the clamp would change it after the first step"
            )
        if chunk_size < 0:
            raise ValueError(f"loss.chunk_size must be >= 0, got {chunk_size}")
        if queue_size < 0:
            raise ValueError(f"loss.queue_size must be >= 0, got {queue_size}")
        log_scale = torch.tensor(math.log(init_scale))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_logit_scale = float(max_logit_scale)
        self.chunk_size = int(chunk_size) or None
        self.queue = NegativeQueue(queue_size) if queue_size > 0 else None

    @property
    def logit_scale(self) -> torch.Tensor:
        """The module's own multiplier ``exp(log_scale)`` (0-d)."""
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the own scale to ``[1, max_logit_scale]`` after each optimiser step (CLIP)."""
        self.log_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def _scale(self, logit_scale: torch.Tensor | None, world_size: int) -> torch.Tensor:
        if logit_scale is not None:
            return logit_scale
        s = self.logit_scale
        # The trainer does not wrap the loss in DDP: average its own scale's gradient here.
        # Averaging is idempotent, so it stays right if something else averages it too.
        return average_grad(s) if world_size > 1 and s.requires_grad else s

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        hard_negatives: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of queries ``q (n, D)`` against keys ``k (n, D)`` (+ hard negatives ``(n*h, D)``).

        ``logit_scale`` / ``logit_bias``: the model's own (already exponentiated) scale and bias;
        when None the module's own are used. Under torch.distributed with ``world_size > 1`` all
        ranks must call this together with the same structure (hard negatives or not).

        Returns:
            0-d loss; see the module docstring for its distributed normalisation.

        Raises:
            ValueError: mismatched shapes.
        """
        check_pair(q, k, {"hard_negatives": hard_negatives})
        _, w = world()
        s = self._scale(logit_scale, w)
        extra = self.queue.get() if self.queue is not None and self.training else None
        if w == 1:
            loss = self._local(q, k, hard_negatives, s, logit_bias, extra)
            k_all = k
        else:
            sizes = gather_sizes(q.shape[0], q.device)
            k_all, offset = all_gather_with_grad(k, sizes)  # (N, D), N = sum of local n
            hn_all = None
            if hard_negatives is not None:
                hn_all, _ = all_gather_with_grad(hard_negatives)  # (N*h, D)
            keys = [t.to(k.dtype) for t in (k_all, hn_all, extra) if t is not None]
            keys_all = torch.cat(keys) if len(keys) > 1 else k_all  # (N + N*h + Q, D)
            loss = self._sharded(q, k, keys_all, sizes, offset, s, logit_bias, w)
        if self.queue is not None and self.training:
            self.queue.push(k_all.detach())
        return loss

    def _local(self, q, k, hard_negatives, s, logit_bias, extra) -> torch.Tensor:
        raise NotImplementedError

    def _sharded(self, q, k, keys_all, sizes, offset, s, logit_bias, w) -> torch.Tensor:
        raise NotImplementedError


class InfoNCELoss(ContrastiveLoss):
    """CLIP / SimCSE InfoNCE (:func:`clipkit.losses.info_nce`) with its temperature.

    Args:
        temperature: initial temperature (CLIP 0.07; SimCSE 0.05 fixed).
        symmetric: average both directions (CLIP) or queries-to-keys only (SimCSE).
        label_smoothing: as ``F.cross_entropy(label_smoothing=...)``.
        **kwargs: see :class:`ContrastiveLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        symmetric: bool = True,
        label_smoothing: float = 0.0,
        **kwargs,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing}")
        super().__init__(1.0 / temperature, **kwargs)
        self.symmetric = symmetric
        self.label_smoothing = float(label_smoothing)

    def _local(self, q, k, hard_negatives, s, logit_bias, extra):
        return info_nce(
            q,
            k,
            s,
            hard_negatives=hard_negatives,
            symmetric=self.symmetric,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
            extra_negatives=extra,
        )

    def _sharded(self, q, k, keys_all, sizes, offset, s, logit_bias, w):
        q_all = all_gather_with_grad(q, sizes)[0] if self.symmetric else None  # (N, D)
        return info_nce_sharded(
            q,
            k,
            s,
            q_all=q_all,
            keys_all=keys_all,
            offset=offset,
            n_global=sum(sizes),
            world_size=w,
            symmetric=self.symmetric,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
        )


class MoCoV3Loss(InfoNCELoss):
    """MoCo v3 (Chen, Xie, He 2021): ``2 T (ctr(q1, k2) + ctr(q2, k1))``, in-batch keys of every
    rank as negatives, no queue; equal to :func:`clipkit.losses.moco_v3_loss`.

    Both views travel in one tensor with their rows interleaved (``q[0::2]`` = view 1, ``q[1::2]``
    = view 2, the same for ``k``), so GradCache's concatenation of micro-batches keeps every
    pair together; each direction is the parent's one-directional InfoNCE (gather, rank-offset
    labels), so N processes equal one process with the global batch as InfoNCE does.

    Args:
        temperature: T (the paper's code: 1.0 for ResNets, 0.2 for ViTs).
        **kwargs: see :class:`ContrastiveLoss` (no queue).
    """

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        if kwargs.get("queue_size"):
            raise ValueError("loss.queue_size applies to moco (v2), not moco_v3 (no queue)")
        super().__init__(temperature, symmetric=False, **kwargs)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        hard_negatives: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q``, ``k``: ``(2n, D)`` interleaved views (student queries, teacher keys)."""
        if hard_negatives is not None:
            raise ValueError("moco_v3 takes no hard negatives")
        if q.shape[0] % 2 or q.shape != k.shape:
            raise ValueError(f"moco_v3 needs (2n, D) interleaved views, got {tuple(q.shape)}")
        s = logit_scale if logit_scale is not None else self.logit_scale
        fwd = super().forward
        ctr = fwd(q[0::2], k[1::2], logit_scale=logit_scale) + fwd(
            q[1::2], k[0::2], logit_scale=logit_scale
        )
        return 2.0 * ctr / s  # 2 T (...), T = 1 / scale


class SigLIPLoss(ContrastiveLoss):
    """SigLIP sigmoid loss (:func:`clipkit.losses.siglip_loss`) with learnable scale and bias.

    Args:
        init_scale: initial multiplier (SigLIP: 10).
        init_bias: initial bias (SigLIP: -10).
        **kwargs: see :class:`ContrastiveLoss`; ``learnable`` applies to the bias too.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, **kwargs) -> None:
        super().__init__(init_scale, **kwargs)
        bias = torch.tensor(float(init_bias))
        if kwargs.get("learnable", True):
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias)

    def _bias(self, logit_bias: torch.Tensor | None, w: int) -> torch.Tensor:
        if logit_bias is not None:
            return logit_bias
        return average_grad(self.bias) if w > 1 and self.bias.requires_grad else self.bias

    def _local(self, q, k, hard_negatives, s, logit_bias, extra):
        return siglip_loss(
            q,
            k,
            s,
            self._bias(logit_bias, 1),
            hard_negatives=hard_negatives,
            chunk_size=self.chunk_size,
            extra_negatives=extra,
        )

    def _sharded(self, q, k, keys_all, sizes, offset, s, logit_bias, w):
        return siglip_sharded(
            q,
            s,
            self._bias(logit_bias, w),
            keys_all=keys_all,
            offset=offset,
            n_global=sum(sizes),
            world_size=w,
            chunk_size=self.chunk_size,
        )


def _no_hard_negatives(name: str, hard_negatives: torch.Tensor | None) -> None:
    if hard_negatives is not None:
        raise ValueError(f"loss.name={name} takes no hard negatives")


class NTXentLoss(ContrastiveLoss):
    """SimCLR's NT-Xent (:func:`clipkit.losses.nt_xent`) with its temperature and the gather.

    ``forward(q, k)`` takes the two views' embeddings ``(n, D)`` (``q[i]``, ``k[i]``: one image).
    With ``world_size > 1`` every rank's views are gathered with gradient and each rank scores
    its own ``2n`` rows against all ``2N`` (see :func:`~clipkit.losses.ntxent.nt_xent_sharded`).

    Args:
        temperature: SimCLR's temperature (0.5 in lightly's CIFAR-10 recipe, 0.1 at batch 4096).
        **kwargs: see :class:`ContrastiveLoss` (no queue: NT-Xent's negatives are in-batch).
    """

    def __init__(self, temperature: float = 0.5, **kwargs) -> None:
        if not temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        if kwargs.get("queue_size", 0):
            raise ValueError("loss.queue_size applies to infonce, siglip and moco, not nt_xent")
        super().__init__(1.0 / temperature, **kwargs)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        hard_negatives: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """NT-Xent of views ``q (n, D)`` and ``k (n, D)``; distributed normalisation as above."""
        _no_hard_negatives("nt_xent", hard_negatives)
        check_pair(q, k, {})
        _, w = world()
        s = self._scale(logit_scale, w)
        if w == 1:
            return nt_xent_scaled(q, k, s, self.chunk_size)
        z1, z2 = unit(q), unit(k)  # (n, D) each
        sizes = gather_sizes(q.shape[0], q.device)
        # Each rank contributes its [z1; z2] block: 2n rows, so the gather sizes double.
        z_all, offset = all_gather_with_grad(torch.cat([z1, z2]), [2 * n for n in sizes])
        return nt_xent_sharded(
            z1,
            z2,
            s,
            z_all=z_all,  # (2N, D)
            offset=offset,
            n_global=sum(sizes),
            world_size=w,
            chunk_size=self.chunk_size,
        )


class MoCoLoss(ContrastiveLoss):
    """MoCo v2's loss (:func:`clipkit.losses.moco_loss`) with its queue of every rank's keys.

    ``forward(q, k)``: queries ``(n, D)`` from the student, keys ``(n, D)`` from the momentum
    teacher. The negatives are the queue's rows only. After the loss, while training, the keys
    of all ranks (gathered, rank order) are pushed, so the queue is identical on every rank and
    equals the one-process queue of the global batch. Before the first step the queue holds
    random unit vectors drawn from a fixed seed (the MoCo and lightly initialisation, and the
    same on every rank without communication); it is a buffer, so checkpoints carry it.

    Args:
        temperature: MoCo's temperature (v2: 0.2).
        queue_size: keys in the queue (v2: 65,536); a positive multiple of the keys pushed per
            step (rows per process x processes x accumulation steps), checked on every call.
        **kwargs: see :class:`ContrastiveLoss`.

    Raises:
        ValueError: a non-positive temperature or ``queue_size < 1``.
    """

    QUEUE_SEED = 0  # fixed: every rank draws the same initial queue
    PUSH = ("step", "direction")

    def __init__(
        self, temperature: float = 0.2, *, queue_size: int = 0, push: str = "step", **kwargs
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        if queue_size < 1:
            raise ValueError(f"loss.name=moco needs loss.queue_size >= 1, got {queue_size}")
        if push not in self.PUSH:
            raise ValueError(f"loss.moco_push={push!r}: expected one of {', '.join(self.PUSH)}")
        super().__init__(1.0 / temperature, queue_size=queue_size, **kwargs)
        self.push = push

    @torch.no_grad()
    def _init_queue(self, like: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(self.QUEUE_SEED)
        keys = torch.randn(self.queue.size, like.shape[1], generator=g, dtype=torch.float64)
        self.queue.push(F.normalize(keys, dim=-1).to(device=like.device, dtype=like.dtype))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        hard_negatives: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MoCo loss of ``q (n, D)`` vs ``k (n, D)`` and the queue; then the gathered push.

        Returns:
            0-d: the mean over local queries with one process; with ``W`` processes
            ``W / N_global`` x their sum (exact after DDP averaging, as the module docstring).

        Raises:
            ValueError: shapes, hard negatives, or a queue size that does not fit the batch.
        """
        _no_hard_negatives("moco", hard_negatives)
        check_pair(q, k, {})
        _, w = world()
        s = self._scale(logit_scale, w)
        sizes = [q.shape[0]] if w == 1 else gather_sizes(q.shape[0], q.device)
        check_queue_size(self.queue.size, sum(sizes))
        if self.queue.get() is None:
            self._init_queue(k)
        # A copy: the push below edits the buffer in place, and backward recomputes the tiles.
        negatives = self.queue.get().clone()  # (Q, D)

        def gathered(keys: torch.Tensor) -> torch.Tensor:  # every rank's, rank order
            if w == 1:
                return keys
            return all_gather_with_grad(keys, [n // 2 for n in sizes])[0]

        if self.push == "step":
            rows = moco_rows(q, k, negatives, s, self.chunk_size)  # (n,)
            pushes = [unit(k.detach())]  # lightly and MoCo queue the normalised keys
            if w > 1:
                pushes = [all_gather_with_grad(pushes[0], sizes)[0]]
        else:
            # Rows interleave the directions (view-1 query, view-2 query of each image): the
            # view-1 rows score against the queue, their keys (every rank's) are pushed, and
            # the view-2 rows score against that queue, as two calls of lightly's loss do.
            if q.shape[0] % 2 or any(n % 2 for n in sizes):
                raise ValueError(f"loss.moco_push=direction needs (2n, D) rows, got {q.shape}")
            first = gathered(unit(k[0::2].detach()))  # (N_global / 2, D)
            r1 = moco_rows(q[0::2], k[0::2], negatives, s, self.chunk_size)  # (n / 2,)
            r2 = moco_rows(q[1::2], k[1::2], self.queue.pushed(first), s, self.chunk_size)
            rows = torch.stack([r1, r2], 1).flatten()  # (n,) interleaved back
            pushes = [first, gathered(unit(k[1::2].detach()))]
        loss = rows.mean() if w == 1 else rows.sum() * (w / sum(sizes))
        if self.training:
            for keys in pushes:
                self.queue.push(keys)
        return loss


def _temperature_loss(
    cls: type[ContrastiveLoss], cfg: LossConfig, **extra: object
) -> ContrastiveLoss:
    """The self-supervised losses take the same settings: a temperature and the shared ones
    (plus ``extra``, a loss's own)."""
    return cls(
        cfg.temperature,
        learnable=cfg.learnable_temperature,
        max_logit_scale=cfg.max_logit_scale,
        chunk_size=cfg.chunk_size,
        queue_size=cfg.queue_size,
        **extra,
    )


# name -> builder from the loss config; the error for an unknown name lists these keys.
LOSSES = {
    "infonce": lambda cfg: InfoNCELoss(
        cfg.temperature,
        symmetric=cfg.symmetric,
        label_smoothing=cfg.label_smoothing,
        learnable=cfg.learnable_temperature,
        max_logit_scale=cfg.max_logit_scale,
        chunk_size=cfg.chunk_size,
        queue_size=cfg.queue_size,
    ),
    "siglip": lambda cfg: SigLIPLoss(
        cfg.siglip_init_scale,
        cfg.siglip_init_bias,
        learnable=cfg.learnable_temperature,
        max_logit_scale=cfg.max_logit_scale,
        chunk_size=cfg.chunk_size,
        queue_size=cfg.queue_size,
    ),
    "nt_xent": lambda cfg: _temperature_loss(NTXentLoss, cfg),
    "moco_v3": lambda cfg: _temperature_loss(MoCoV3Loss, cfg),
    "moco": lambda cfg: _temperature_loss(MoCoLoss, cfg, push=cfg.moco_push),
    # No temperature to learn: clipkit/losses/noncontrastive.py.
    "barlow_twins": lambda cfg: BarlowTwinsLoss.from_config(cfg),
    "byol": lambda cfg: BYOLLoss.from_config(cfg),
    "swav": lambda cfg: SwAVLoss.from_config(cfg),
}


def build_loss(cfg: LossConfig) -> nn.Module:
    """Build the loss named by ``cfg.name`` from :data:`LOSSES`.

    With ``cfg.ssl_weight > 0`` (SLIP) that loss, infonce or siglip, is wrapped in a
    :class:`~clipkit.losses.slip.SLIPLoss` that adds ``ssl_weight`` x NT-Xent over two views.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or invalid settings.
    """
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss.name '{cfg.name}'; valid: {', '.join(sorted(LOSSES))}")
    if cfg.name != "infonce" and cfg.label_smoothing:
        raise ValueError(f"loss.label_smoothing applies to infonce only (loss.name={cfg.name})")
    if not (cfg.ssl_weight >= 0 and math.isfinite(cfg.ssl_weight)):
        raise ValueError(f"loss.ssl_weight must be >= 0 (0 = off, SLIP: 1.0), got {cfg.ssl_weight}")
    if cfg.ssl_weight > 0:
        from clipkit.losses.slip import SLIPLoss

        if cfg.name not in ("infonce", "siglip"):
            raise ValueError(
                f"loss.ssl_weight > 0 (SLIP) adds NT-Xent to infonce or siglip, "
                f"not to loss.name={cfg.name}"
            )
        return SLIPLoss(LOSSES[cfg.name](cfg), cfg.ssl_weight, cfg.ssl_temperature, cfg.chunk_size)
    return LOSSES[cfg.name](cfg)
