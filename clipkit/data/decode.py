"""Image bytes -> uint8 ``(3, S, S)`` tensors: the train crop and the eval crop.

The train transform draws the same crop box distribution as open_clip's
``RandomResizedCrop(S, scale, ratio=(3/4, 4/3), bicubic)`` (torchvision's ``get_params``
algorithm), but it samples the box on the JPEG's header size *before* decoding, then asks
libjpeg-turbo (``simplejpeg``) for the smallest DCT scale (n/8) whose decoded crop still
covers ``S x S``, and resizes the crop with torch's antialiased bicubic on the uint8 array itself
(a strided view of the decoded ``(h, w, 3)`` array: no PIL image, no crop copy). That kernel is
PIL's algorithm vectorised for uint8: 0.06 mean absolute difference from PIL's bicubic on 200
decoded crops (2e-5 of values off by more than 2) at about 1/4 of its time; PIL's was 44% of
a sample's cost (bench/README.md's loader profile). The full-size decode + resize is the bulk of
open_clip's per-sample cost (see ANCHORS.md); the DCT-scaled decode skips most of the IDCT and
colour conversion work. ``fast=False`` is open_clip's path instead: full PIL decode and PIL's
``resized_crop`` (pixel-identical to torchvision, tested).

Non-JPEG images (PNG, WebP, ...), CMYK JPEGs and JPEGs with an EXIF rotation are decoded by PIL
(draft decode for JPEGs, ``exif_transpose``, 16-bit and palette/alpha conversion to RGB).

The eval transform uses PIL and torchvision exactly like open_clip's ``preprocess_eval``
(resize shortest side, bicubic, center crop), so the pixels match it.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

Box = tuple[int, int, int, int]  # (top, left, height, width) in original pixels

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class DecodeError(ValueError):
    """Bytes that are not a decodable image."""


def crop_params(rng: random.Random, height: int, width: int, scale: tuple[float, float]) -> Box:
    """Draw a RandomResizedCrop box; the algorithm of torchvision's ``get_params``.

    Args:
        rng: source of randomness (per sample, so resuming needs no replay).
        height, width: original image size in pixels.
        scale: range of the crop area as a fraction of the image area.

    Returns:
        ``(top, left, h, w)`` of the crop in original pixels.
    """
    area = height * width
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback: whole image clipped to the ratio range, centred (as torchvision does).
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        h, w = height, int(round(height * _RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation tag of a JPEG (1 when absent); scans only the APP segments."""
    pos, n = 2, len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            return 1
        seg_len = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + seg_len])
        pos += 2 + seg_len
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8:
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: greyscale, palette, alpha (dropped), CMYK, 16/32-bit integer."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL clips 16-bit values into 8 bits instead of scaling them; scale by the bit depth.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_pil(data: bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode any image PIL knows, EXIF-rotated, as RGB.

    Args:
        data: encoded image bytes.
        draft: for JPEGs, the smallest size the decoded image may have (DCT scaling).

    Raises:
        DecodeError: when PIL cannot decode the bytes.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Exception as err:  # PIL raises many types for bad bytes
        raise DecodeError(f"undecodable image ({type(err).__name__}: {err})") from err


def _to_chw(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)  # (S, S, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, S, S)


def _box_in(box: Box, have: tuple[int, int], full: tuple[int, int]) -> Box:
    """``box`` (original pixels of a ``full`` (h, w) image) in the pixels of a ``have`` (h', w')
    decode of it (a DCT-downscaled one: scaled and rounded, at least 1 pixel)."""
    if have == full:
        return box
    top, left, h, w = box
    sy, sx = have[0] / full[0], have[1] / full[1]
    y0, x0 = round(top * sy), round(left * sx)
    y1 = min(have[0], max(y0 + 1, round((top + h) * sy)))
    x1 = min(have[1], max(x0 + 1, round((left + w) * sx)))
    return y0, x0, y1 - y0, x1 - x0


def _resize_box(img: Image.Image, box: Box, full: tuple[int, int], size: int) -> torch.Tensor:
    """open_clip's op: crop ``box`` out of ``img`` with PIL, then PIL's bicubic resize.

    Crop-then-resize (not PIL's ``box=`` resize, which also samples pixels just outside the
    box) is what torchvision's ``resized_crop`` does on PIL images.
    """
    top, left, h, w = _box_in(box, (img.height, img.width), full)
    crop = img.crop((left, top, left + w, top + h))
    return _to_chw(crop.resize((size, size), Image.Resampling.BICUBIC))


def _resize_box_array(arr: np.ndarray, box: Box, full: tuple[int, int], size: int) -> torch.Tensor:
    """The fast path's crop + resize of a decoded ``(h', w', 3)`` uint8 array (no copy)."""
    return resize_crop(torch.from_numpy(arr).permute(2, 0, 1), box, full, size)


def resize_crop(image: torch.Tensor, box: Box, full: tuple[int, int], size: int) -> torch.Tensor:
    """Crop ``box`` (original pixels of a ``full`` (h, w) image) out of a decode of it and resize
    to ``S x S`` with antialiased bicubic: the train crop of the fast and the device paths.

    Args:
        image: uint8 ``(3, h', w')``, any strides (a view of an ``(h', w', 3)`` array is fine),
            on the CPU or a GPU; ``(h', w')`` may be a DCT-downscaled size of ``full``.
        box: ``(top, left, h, w)`` in ``full`` pixels.
        full: the original image's ``(h, w)``.
        size: output side ``S``.

    Returns:
        uint8 ``(3, S, S)`` on the image's device. On the CPU torch's uint8 kernel (PIL's
        algorithm); elsewhere the same filter in float32, rounded to uint8.
    """
    top, left, h, w = _box_in(box, (image.shape[1], image.shape[2]), full)
    x = image[None, :, top : top + h, left : left + w]  # (1, 3, h, w) view
    if h == size and w == size:
        return x[0].contiguous()
    if x.device.type == "cpu":
        return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0]
    y = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)[0]
    return y.round_().clamp_(0, 255).to(torch.uint8)  # (3, S, S)


def device_crop_plan(
    data: bytes, rng: random.Random, scale: tuple[float, float]
) -> tuple[Box, tuple[int, int]] | None:
    """The train crop's box, for a JPEG to be decoded on the training device.

    Draws the box with the same random calls as :func:`train_crop`, so a sample gets the same
    box on either path. None (nothing drawn): not a JPEG the device path takes, i.e. not a
    JPEG, an unreadable header, CMYK / YCCK, an EXIF rotation, or no end-of-image marker (a
    truncated file): those are decoded on the CPU, where a broken one is skipped and counted.

    Returns:
        ``((top, left, h, w), (height, width))`` in original pixels, or None.
    """
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace in ("CMYK", "YCCK") or _jpeg_orientation(data) != 1:
        return None
    return crop_params(rng, h, w, scale), (h, w)


def train_crop(
    data: bytes,
    size: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.9, 1.0),
    fast: bool = True,
) -> torch.Tensor:
    """Decode and RandomResizedCrop an image.

    Args:
        data: encoded image bytes (JPEG, PNG, WebP, ... anything PIL opens).
        size: output side ``S``.
        rng: per-sample random source for the crop box.
        scale: crop area range, as open_clip's ``AugmentationCfg.scale`` (default (0.9, 1.0)).
        fast: use DCT-scaled decoding (the default); False decodes at full size with PIL,
            as open_clip does.

    Returns:
        uint8 tensor ``(3, S, S)``.

    Raises:
        DecodeError: when the bytes are not a decodable image.
    """
    # One box: the multi-view decoder with a single view (same RNG use, same pixels).
    return crop_boxes(data, size, lambda h, w: [crop_params(rng, h, w, scale)], fast)[0]


def crop_boxes(
    data: bytes,
    size: int,
    boxes: Callable[[int, int], list[Box]],
    fast: bool = True,
    sizes: Callable[[int], int] | None = None,
) -> list[torch.Tensor]:
    """Decode an image once and crop-resize several boxes out of it (the views of one sample).

    Like :func:`train_crop`, but the JPEG is DCT-scaled to the smallest size whose crops *all*
    still cover their output side, so V views cost one decode.

    Args:
        data: encoded image bytes.
        size: output side ``S``.
        boxes: ``(height, width) -> [(top, left, h, w), ...]`` in original pixels, called once
            with the image's size (read from the JPEG header when possible).
        fast: use DCT-scaled decoding; False decodes at full size with PIL.
        sizes: box index -> its output side, when the boxes differ (SwAV's multi-crop: small
            crops at a smaller side); None: every box at ``size``.

    Returns:
        One uint8 ``(3, S_i, S_i)`` tensor per box.

    Raises:
        DecodeError: when the bytes are not a decodable image.
    """

    def side(i: int) -> int:
        return size if sizes is None else sizes(i)

    if fast and data[:2] == b"\xff\xd8":
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as err:
            raise DecodeError(f"undecodable JPEG ({err})") from err
        if colorspace not in ("CMYK", "YCCK") and _jpeg_orientation(data) == 1:
            bxs = boxes(h, w)
            min_h = max(math.ceil(side(i) * h / b[2]) for i, b in enumerate(bxs))
            min_w = max(math.ceil(side(i) * w / b[3]) for i, b in enumerate(bxs))
            try:
                arr = simplejpeg.decode_jpeg(
                    data, colorspace="RGB", min_height=min(min_h, h), min_width=min(min_w, w)
                )  # (h', w', 3)
            except ValueError as err:
                raise DecodeError(f"undecodable JPEG ({err})") from err
            return [_resize_box_array(arr, b, (h, w), side(i)) for i, b in enumerate(bxs)]
    img = open_pil(data)
    full = (img.height, img.width)
    if fast:  # PNG, WebP, CMYK or rotated JPEG: PIL decodes, the same resize as JPEGs
        arr = np.array(img, dtype=np.uint8)  # (h, w, 3), writable
        return [_resize_box_array(arr, b, full, side(i)) for i, b in enumerate(boxes(*full))]
    return [_resize_box(img, b, full, side(i)) for i, b in enumerate(boxes(*full))]


def eval_crop(data: bytes, size: int) -> torch.Tensor:
    """Resize the shortest side to ``size`` (bicubic) and center-crop, as open_clip's eval.

    Args:
        data: encoded image bytes.
        size: output side ``S``.

    Returns:
        uint8 tensor ``(3, S, S)``.

    Raises:
        DecodeError: when the bytes are not a decodable image.
    """
    img = open_pil(data)
    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
    img = TF.center_crop(img, size)
    return _to_chw(img)


class DeviceNormalize:
    """:func:`normalize` with its ``(3,)`` mean and std copied once to each device it meets (a
    host -> device copy every step would sync the stream). What the tasks call on their batches.

    Args:
        mean, std: per-channel statistics of the model's preprocessing.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self._host = (torch.tensor(mean), torch.tensor(std))  # (3,) each
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, H, W)`` -> float32 normalised, on the images' device."""
        dev = images.device
        if dev not in self._on:
            self._on[dev] = (self._host[0].to(dev), self._host[1].to(dev))
        return normalize(images, *self._on[dev])


def normalize(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> normalised float, ``(x / 255 - mean) / std``.

    Args:
        images: uint8 (or already float, returned unchanged) batch ``(B, 3, H, W)``.
        mean, std: ``(3,)`` tensors.
        dtype: output dtype.

    Returns:
        ``(B, 3, H, W)`` tensor of ``dtype`` on the images' device.
    """
    if images.is_floating_point():
        return images
    scale = (1.0 / (255.0 * std)).to(images.device, dtype).view(1, 3, 1, 1)
    shift = (mean / std).to(images.device, dtype).view(1, 3, 1, 1)
    return images.to(dtype) * scale - shift  # (B, 3, H, W)
