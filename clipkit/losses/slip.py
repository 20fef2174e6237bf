"""SLIP's loss (Mu et al. 2021, arXiv 2112.12750): CLIP's loss + ``w`` x SimCLR's NT-Xent.

``SLIPLoss(q, k, extra={"ssl_1": z1, "ssl_2": z2})`` is the configured CLIP loss (InfoNCE or
SigLIP, with the model's learnable scale) on image / caption embeddings plus ``ssl_weight`` times
NT-Xent at a fixed temperature on the SSL head's projections of two augmented views of the same
images (SLIP: weight 1.0, temperature 0.1). Each part is one of the registry's modules, so each
gathers its own inputs with gradient and returns ``W / N_global`` x its rows' sum: the weighted
sum is exact under DDP averaging, like either part alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clipkit.losses.module import ContrastiveLoss, NTXentLoss
from clipkit.losses.tiled import acc_dtype

# The names under which the task hands the two views' projections to the loss (Embeddings.extra).
VIEW_KEYS = ("ssl_1", "ssl_2")


class SLIPLoss(nn.Module):
    """``clip_loss(q, k) + weight * nt_xent(extra["ssl_1"], extra["ssl_2"], temperature)``.

    Args:
        clip_loss: the image-caption loss (an ``InfoNCELoss`` or ``SigLIPLoss``); it keeps its
            own options (hard negatives, queue, label smoothing) and the model's scale.
        weight: ``w > 0``, SLIP's ``ssl_scale`` (1.0).
        temperature: NT-Xent's fixed temperature (SLIP: 0.1); not learned.
        chunk_size: NT-Xent's tile edge (0: default).

    Attributes:
        parts: the last call's ``{"loss_clip", "loss_ssl"}`` (detached 0-d tensors, this rank's
            values before the weighting), for logging.

    Raises:
        ValueError: a non-positive or non-finite weight or temperature.

    Example:
        >>> loss = SLIPLoss(InfoNCELoss(0.07), weight=1.0, temperature=0.1)
        >>> loss(img, txt, logit_scale=s, extra={"ssl_1": z1, "ssl_2": z2})  # doctest: +SKIP
    """

    def __init__(
        self, clip_loss: ContrastiveLoss, weight: float, temperature: float, chunk_size: int = 0
    ) -> None:
        super().__init__()
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"loss.ssl_weight must be > 0 for SLIP, got {weight}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"loss.ssl_temperature must be > 0, got {temperature}")
        self.clip_loss = clip_loss
        # The fixed temperature is passed as a float64 scale at each call (below), so its
        # buffer is never read; learnable=False keeps it out of the optimiser.
        self.ssl_loss = NTXentLoss(temperature, learnable=False, chunk_size=chunk_size)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.parts: dict[str, torch.Tensor] = {}

    @property
    def logit_scale(self) -> torch.Tensor:
        """The CLIP part's own scale (used when the model passes none)."""
        return self.clip_loss.logit_scale

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the CLIP part's scale; NT-Xent's temperature is fixed (even above the cap)."""
        self.clip_loss.clamp_()

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
        """SLIP loss of image ``q (n, D)`` / caption ``k (n, D)`` embeddings and two views.

        Args:
            q, k, hard_negatives, logit_scale, logit_bias: as the CLIP part takes them.
            extra: ``{"ssl_1": (n, P), "ssl_2": (n, P)}``: the SSL head's projections of the
                same ``n`` images' two views (row ``i`` of each is image ``i``).

        Returns:
            0-d ``clip + weight * ssl``; distributed normalisation as each part's.

        Raises:
            ValueError: missing views or rows that do not match ``q``.
        """
        if extra is None or any(name not in extra for name in VIEW_KEYS):
            raise ValueError(
                "loss.ssl_weight > 0 (SLIP) needs the views' projections "
                f"(extra={{{', '.join(VIEW_KEYS)}}}); only task=clip provides them"
            )
        z1, z2 = (extra[name] for name in VIEW_KEYS)  # (n, P) each
        if z1.shape[0] != q.shape[0]:
            raise ValueError(f"SLIP: {z1.shape[0]} view rows for {q.shape[0]} images")
        clip = self.clip_loss(
            q, k, hard_negatives=hard_negatives, logit_scale=logit_scale, logit_bias=logit_bias
        )
        # 1 / T in float64, then the loss's dtype: exact against a float64 reference.
        scale = torch.tensor(1.0 / self.temperature, dtype=torch.float64, device=z1.device)
        ssl = self.ssl_loss(z1, z2, logit_scale=scale.to(acc_dtype(z1)))
        self.parts = {"loss_clip": clip.detach(), "loss_ssl": ssl.detach()}
        return clip + self.weight * ssl


__all__ = ["VIEW_KEYS", "SLIPLoss"]
