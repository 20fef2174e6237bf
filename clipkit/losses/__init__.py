"""Contrastive losses: exact, tiled (no ``N x N`` matrix), distributed-exact.

Pure functions :func:`info_nce`, :func:`siglip_loss`, :func:`nt_xent` (SimCLR),
:func:`moco_loss`, :func:`moco_v3_loss`, :func:`barlow_twins_loss`, :func:`negative_cosine`
(BYOL) and :func:`swav_loss`; modules holding the temperature, the all-gather and
the negatives queue, built by name with :func:`build_loss` (``SLIPLoss``: CLIP + NT-Xent).
"""

from clipkit.losses.barlow_twins import barlow_twins_loss
from clipkit.losses.byol import negative_cosine
from clipkit.losses.infonce import info_nce, info_nce_sharded
from clipkit.losses.moco import moco_loss, moco_v3_loss
from clipkit.losses.module import (
    LOSSES,
    ContrastiveLoss,
    InfoNCELoss,
    MoCoLoss,
    MoCoV3Loss,
    NTXentLoss,
    SigLIPLoss,
    build_loss,
)
from clipkit.losses.noncontrastive import BarlowTwinsLoss, BYOLLoss, NonContrastiveLoss, SwAVLoss
from clipkit.losses.ntxent import nt_xent, nt_xent_sharded
from clipkit.losses.queue import NegativeQueue
from clipkit.losses.siglip import siglip_loss, siglip_sharded
from clipkit.losses.slip import SLIPLoss
from clipkit.losses.swav import sinkhorn_codes, swav_loss

__all__ = [
    "LOSSES",
    "BYOLLoss",
    "BarlowTwinsLoss",
    "ContrastiveLoss",
    "InfoNCELoss",
    "MoCoLoss",
    "MoCoV3Loss",
    "NTXentLoss",
    "NegativeQueue",
    "NonContrastiveLoss",
    "SLIPLoss",
    "SigLIPLoss",
    "SwAVLoss",
    "barlow_twins_loss",
    "build_loss",
    "info_nce",
    "info_nce_sharded",
    "moco_loss",
    "moco_v3_loss",
    "negative_cosine",
    "nt_xent",
    "nt_xent_sharded",
    "siglip_loss",
    "siglip_sharded",
    "sinkhorn_codes",
    "swav_loss",
]
