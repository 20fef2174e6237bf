"""Data: WebDataset shard readers for training and evaluation; the one input layer.

``clipkit.data.sources`` detects, expands and reads every input form (ImageFolder, shards,
CLIP_benchmark layouts, caption tables, COCO JSON, image folders, text) for evaluation,
``clipkit embed`` and ``data_tools``.

``build_train_loader`` (epoch or resampled mode, exact resume, fast JPEG decode) and
``build_eval_loader`` (deterministic, open_clip's eval transform). See
:mod:`clipkit.data.loader`.
"""

from clipkit.data.decode import DeviceNormalize, eval_crop, normalize, train_crop
from clipkit.data.loader import ShardLoader, build_eval_loader, build_train_loader

__all__ = [
    "DeviceNormalize",
    "ShardLoader",
    "build_eval_loader",
    "build_train_loader",
    "eval_crop",
    "normalize",
    "train_crop",
]
