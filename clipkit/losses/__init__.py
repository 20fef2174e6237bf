"""Contrastive losses: exact, tiled (no ``N x N`` matrix), distributed-exact.

Pure functions :func:`info_nce` and :func:`siglip_loss`; modules holding the temperature,
the all-gather and the negatives queue, built by name with :func:`build_loss`.
"""

from clipkit.losses.infonce import info_nce, info_nce_sharded
from clipkit.losses.module import (
    LOSSES,
    ContrastiveLoss,
    InfoNCELoss,
    SigLIPLoss,
    build_loss,
)
from clipkit.losses.queue import NegativeQueue
from clipkit.losses.siglip import siglip_loss, siglip_sharded

__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "InfoNCELoss",
    "NegativeQueue",
    "SigLIPLoss",
    "build_loss",
    "info_nce",
    "info_nce_sharded",
    "siglip_loss",
    "siglip_sharded",
]
