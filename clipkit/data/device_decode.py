"""JPEG decoding on the training device (``data.decode=device``): nvJPEG through torchvision.

On a GPU host the loader's CPU decode bounds training (bench/results/gpu_data_16core_w8.log:
1,254 samples/s from 8 workers against ~2,400 a H100 trains ViT-B/32 at). With this path the
workers only read the shards, draw each sample's crop box from the JPEG header (the same random
calls as the CPU path, :func:`clipkit.data.decode.device_crop_plan`) and ship the encoded bytes;
the main process decodes the batch with ``torchvision.io.decode_jpeg(..., device=cuda)``, then
crops and resizes every image on the device (:func:`clipkit.data.decode.resize_crop`).

Images the device path does not take (not JPEG, CMYK, EXIF-rotated, truncated) are decoded by the
workers as before and travel as pixels. The sample order, boxes, captions and the loader state
are those of the CPU path, so resume stays exact; only the pixels differ (full-size decode +
float bicubic instead of DCT-scaled decode + uint8 bicubic). A JPEG the device cannot decode is
decoded on the CPU in the main process; one that fails there too becomes a zero image (counted
as ``device_decode_failed``: the batch is already formed, it cannot be skipped).

Batch layout from the workers (see :func:`pack`): ``image`` uint8 ``(n_cpu, 3, S, S)`` with
``image_rows`` long ``(n_cpu,)``, ``jpeg`` uint8 ``(bytes,)`` (all the batch's JPEGs, one
buffer: one shared-memory segment per batch, not one per image), ``jpeg_offsets`` long
``(B + 1,)`` (row i's bytes are ``jpeg[off[i]:off[i+1]]``, empty for CPU rows) and
``jpeg_box`` long ``(B, 6)`` (top, left, h, w, height, width). :func:`unpack` turns that into
``image`` uint8 ``(B, 3, S, S)`` on the device.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Any

import torch

from clipkit.data.decode import DecodeError, crop_boxes, resize_crop

log = logging.getLogger(__name__)

MODES = ("workers", "device")


def check_mode(mode: str) -> None:
    """``data.decode`` must name a mode; one line otherwise."""
    if mode not in MODES:
        raise ValueError(f"data.decode={mode!r}: expected one of {', '.join(MODES)}")


def device_for_decode() -> torch.device | None:
    """The CUDA device this process trains on, or None (no CUDA: the workers decode)."""
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def pack(items: list[dict[str, Any]], size: int) -> dict[str, torch.Tensor]:
    """Collate the image part of a batch whose items hold ``image`` or ``jpeg`` + ``jpeg_box``."""
    rows = [i for i, it in enumerate(items) if "image" in it]
    blobs = [it.get("jpeg", b"") for it in items]
    offsets = [0]
    for b in blobs:
        offsets.append(offsets[-1] + len(b))
    boxes = [tuple(it["jpeg_box"]) if "jpeg_box" in it else (0,) * 6 for it in items]
    joined = b"".join(blobs)
    return {
        "image": (
            torch.stack([items[i]["image"] for i in rows])
            if rows
            else torch.empty(0, 3, size, size, dtype=torch.uint8)
        ),  # (n_cpu, 3, S, S)
        "image_rows": torch.tensor(rows, dtype=torch.long),  # (n_cpu,)
        "jpeg": torch.frombuffer(bytearray(joined), dtype=torch.uint8)
        if joined
        else torch.empty(0, dtype=torch.uint8),  # (bytes,)
        "jpeg_offsets": torch.tensor(offsets, dtype=torch.long),  # (B + 1,)
        "jpeg_box": torch.tensor(boxes, dtype=torch.long).view(-1, 6),  # (B, 6)
    }


def _decode_each(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; its batched
        # nvJPEG decode is still the one named for this path, so one warning per batch is noise.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        try:  # one batched call: nvJPEG's batched decode on CUDA
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for d in datas:  # find the image(s) the batch call failed on
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def unpack(
    batch: dict[str, Any], size: int, device: torch.device, stats: Counter | None = None
) -> dict[str, Any]:
    """Decode, crop and resize a packed batch's JPEGs on ``device``; returns the batch with
    ``image`` uint8 ``(B, 3, S, S)`` on ``device`` and the packing keys removed.

    Args:
        batch: a worker batch packed by :func:`pack` (other keys are kept as they are).
        size: output side ``S``.
        device: where to decode (CUDA: nvJPEG; the CPU also works, as in the tests).
        stats: counters to add ``device_decode_cpu`` (decoded on the CPU after the device
            failed) and ``device_decode_failed`` (zero image) to.
    """
    offs = batch.pop("jpeg_offsets").tolist()
    blob = batch.pop("jpeg")
    boxes = batch.pop("jpeg_box").tolist()
    rows = batch.pop("image_rows")
    n = len(offs) - 1
    out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)  # (B, 3, S, S)
    cpu_images = batch["image"]
    if rows.numel():
        out[rows.to(device)] = cpu_images.to(device, non_blocking=True)
    todo = [i for i in range(n) if offs[i + 1] > offs[i]]
    decoded = _decode_each([blob[offs[i] : offs[i + 1]] for i in todo], device) if todo else []
    for i, img in zip(todo, decoded, strict=True):
        top, left, h, w, height, width = boxes[i]
        box, full = (top, left, h, w), (height, width)
        if img is not None:
            out[i] = resize_crop(img, box, full, size)
            continue
        try:  # the device refused it: the CPU decoder, same box
            data = blob[offs[i] : offs[i + 1]].numpy().tobytes()
            out[i] = crop_boxes(data, size, lambda _h, _w, b=box: [b])[0].to(device)
            kind = "device_decode_cpu"
        except DecodeError as err:
            out[i] = 0
            kind = "device_decode_failed"
            log.warning("data: %s: %s", batch.get("key", ["?"] * n)[i], err)
        if stats is not None:
            stats[kind] += 1
    batch["image"] = out
    return batch
