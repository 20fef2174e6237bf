"""Barlow Twins (Zbontar et al. 2021, arXiv 2103.03230): the two views' cross-correlation -> I.

Each projection dimension is standardised over the batch, the ``D x D`` cross-correlation of the
two views is taken, its diagonal is pushed to 1 (invariance) and its off-diagonal to 0
(redundancy reduction, weighted by ``lambd``). The value is lightly 1.6's
``BarlowTwinsLoss(lambda_param=lambd)(z1, z2)``: the standardisation is ``F.batch_norm`` in
training mode without affine weights, i.e. the *biased* batch variance (divided by ``N``, not
``N - 1``) with ``eps = 1e-5`` inside the square root; the cross-correlation is divided by ``N``;
the two terms are plain sums over the ``D`` diagonal and ``D (D - 1)`` off-diagonal entries (no
normalisation by ``D``).

The loss is not row-separable: the batch statistics and the cross-correlation are global. Under
torch.distributed, :class:`~clipkit.losses.module.BarlowTwinsLoss` gathers both views with
gradient and every rank evaluates this function on the whole global batch (unlike lightly's
``gather_distributed``, which standardises with each process's own batch statistics).
"""

from __future__ import annotations

import math

import torch

from clipkit.losses.infonce import check_pair
from clipkit.losses.tiled import acc_dtype

BN_EPS = 1e-5  # F.batch_norm's default, which lightly's standardisation uses


def check_barlow(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> None:
    """Two ``(N, D)`` views with ``N >= 2`` and a finite ``lambd >= 0``.

    Raises:
        ValueError: one line naming the bad shape or value.
    """
    check_pair(z1, z2, {})
    if z1.shape[0] < 2:
        raise ValueError(
            f"barlow_twins needs N >= 2 rows (it standardises over the batch), got N={z1.shape[0]}"
        )
    if not (lambd >= 0 and math.isfinite(lambd)):
        raise ValueError(f"barlow_twins lambda must be finite and >= 0, got {lambd}")


def standardize(z: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """Per-dimension batch standardisation ``(z - mean) / sqrt(var + eps)``, biased variance.

    Equal to ``F.batch_norm(z, None, None, training=True, eps=eps)`` (what lightly calls).

    Args:
        z: (N, D) projections.
        eps: added to the variance.

    Returns:
        (N, D) standardised columns.
    """
    zc = z - z.mean(0)  # (N, D)
    var = zc.square().mean(0)  # (D,) biased (divided by N), as batch norm in training mode
    return zc * torch.rsqrt(var + eps)  # (N, D)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """Barlow Twins: ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``.

    ``C = standardize(z1).T @ standardize(z2) / N`` is the ``D x D`` cross-correlation; nothing
    larger than ``D x D`` is built. Under torch.distributed pass the gathered global batch
    (see :class:`~clipkit.losses.module.BarlowTwinsLoss`).

    Args:
        z1: (N, D) projections of the first views (not L2-normalised: the loss standardises).
        z2: (N, D) projections of the second views; ``z2[i]`` is the other view of ``z1[i]``.
        lambd: weight of the redundancy-reduction term (the paper: 5e-3).

    Returns:
        0-d loss in float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched or non-2-D shapes, ``N < 2``, a negative or non-finite lambda.

    Example:
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = barlow_twins_loss(z1, z2, lambd=5e-3)
    """
    check_barlow(z1, z2, lambd)
    dt = acc_dtype(z1, z2)
    n = z1.shape[0]
    c = standardize(z1.to(dt)).T @ standardize(z2.to(dt)) / n  # (D, D)
    on_diag = (c.diagonal() - 1.0).square().sum()
    # C^2 with its diagonal zeroed: no cancellation between sum(C^2) and sum(diag^2) in float32.
    off = c.square()  # (D, D)
    off.diagonal().zero_()
    return on_diag + lambd * off.sum()


__all__ = ["BN_EPS", "barlow_twins_loss", "check_barlow", "standardize"]
