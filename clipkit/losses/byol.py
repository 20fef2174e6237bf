"""BYOL's regression loss (Grill et al. 2020, arXiv 2006.07733) as lightly's BYOL example uses it.

The online network's predictions ``p`` regress the target network's projections ``z``: lightly's
``NegativeCosineSimilarity()(p, z)`` is ``-mean_i cos(p_i, z_i)`` with ``torch``'s
``cosine_similarity`` (``eps = 1e-8``). The paper writes ``2 - 2 cos``: same gradient up to a
factor 2 and a constant, so only the learning rate and the logged value differ.

The task owns the asymmetry: the targets come from the momentum teacher without gradient, and
the symmetrised loss ``(L(p1, z2) + L(p2, z1)) / 2`` is this function on ``q = cat(p1, p2)``,
``k = cat(z2, z1)``. Row-separable, so the distributed form needs no gather (see
:class:`~clipkit.losses.module.BYOLLoss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipkit.losses.infonce import check_pair
from clipkit.losses.tiled import acc_dtype

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default, kept by lightly


def negative_cosine_rows(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-row ``-cos(p_i, z_i)``, shape ``(N,)``, in the accumulation dtype."""
    dt = acc_dtype(p, z)
    return -F.cosine_similarity(p.to(dt), z.to(dt), dim=-1, eps=COS_EPS)  # (N,)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL / SimSiam loss: ``-mean_i cos(p_i, z_i)`` (lightly's ``NegativeCosineSimilarity``).

    Args:
        p: (N, D) predictions of the online network.
        z: (N, D) targets (detach them before the call: the loss does not).

    Returns:
        0-d loss in ``[-1, 1]``, float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched, empty or non-2-D inputs.

    Example:
        >>> p, z = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = negative_cosine(p, z.detach())
    """
    check_pair(p, z, {})
    return negative_cosine_rows(p, z).mean()


__all__ = ["COS_EPS", "negative_cosine", "negative_cosine_rows"]
