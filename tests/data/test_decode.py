"""Decoding and crops: parity with open_clip's transforms, odd image formats, bad bytes."""

from __future__ import annotations

import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from clipkit.data.decode import DecodeError, crop_params, eval_crop, normalize, train_crop

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo(data_root) -> Image.Image:
    path = sorted((data_root / "coco_mini" / "train2017").glob("*.jpg"))[0]
    return Image.open(path).convert("RGB")


def test_eval_crop_matches_open_clip_preprocess(photo):
    data = _jpeg(photo)
    ours = normalize(eval_crop(data, 224)[None], torch.tensor(MEAN), torch.tensor(STD))[0]
    ref = open_clip.image_transform(224, is_train=False, mean=MEAN, std=STD)(
        Image.open(io.BytesIO(data))
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_crop_params_follow_random_resized_crop():
    rng = random.Random(0)
    for _ in range(300):
        h, w = rng.randint(100, 900), rng.randint(100, 900)
        top, left, ch, cw = crop_params(rng, h, w, (0.9, 1.0))
        assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w
        if cw * ch < 0.85 * h * w:  # fallback path: a centred crop clipped to the ratio range
            assert min(cw / ch, ch / cw) >= 0.74


def test_train_crop_equals_torchvision_resized_crop_on_full_decode(photo):
    """Same box, full decode: pixel-identical to torchvision resized_crop (open_clip's op)."""
    data = _jpeg(photo)
    ours = train_crop(data, 96, random.Random(5), fast=False)
    top, left, h, w = crop_params(random.Random(5), photo.height, photo.width, (0.9, 1.0))
    img = Image.open(io.BytesIO(data)).convert("RGB")
    ref = TF.pil_to_tensor(
        TF.resized_crop(img, top, left, h, w, [96, 96], InterpolationMode.BICUBIC)
    )
    assert torch.equal(ours, ref)


def test_fast_decode_is_close_to_full_decode(photo):
    data = _jpeg(photo)
    fast = train_crop(data, 64, random.Random(1), fast=True).float()
    slow = train_crop(data, 64, random.Random(1), fast=False).float()
    assert fast.shape == slow.shape == (3, 64, 64)
    assert (fast - slow).abs().mean() < 3.0  # mean error under 3/255 after DCT downscaling


@pytest.mark.parametrize("fast", [True, False])
def test_odd_formats_become_rgb(photo, fast):
    small = photo.resize((80, 60))
    cases = {
        "grey_jpeg": _jpeg(small.convert("L")),
        "cmyk_jpeg": _jpeg(small.convert("CMYK")),
        "rgba_png": _png(small.convert("RGBA")),
        "palette_png": _png(small.convert("P")),
        "grey_png": _png(small.convert("L")),
    }
    webp = io.BytesIO()
    small.save(webp, "WEBP")
    cases["webp"] = webp.getvalue()
    for name, data in cases.items():
        out = train_crop(data, 32, random.Random(0), fast=fast)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8, name
        assert eval_crop(data, 32).shape == (3, 32, 32), name


def test_16bit_png_is_scaled_not_clipped():
    arr = np.full((40, 40), 32768, dtype=np.uint16)
    arr[:, 20:] = 65535
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = eval_crop(_png(img), 40)
    assert abs(int(out[0, 20, 5]) - 128) <= 1 and int(out[0, 20, 35]) == 255


def test_exif_rotation_is_applied(photo):
    small = photo.resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    rotated = _jpeg(small, exif=exif.tobytes())
    upright = _jpeg(small.transpose(Image.Transpose.ROTATE_270))
    a = eval_crop(rotated, 64).float()
    b = eval_crop(upright, 64).float()
    assert (a - b).abs().mean() < 4.0
    fast = train_crop(rotated, 64, random.Random(0), scale=(1.0, 1.0))
    slow = train_crop(upright, 64, random.Random(0), scale=(1.0, 1.0))
    assert (fast.float() - slow.float()).abs().mean() < 6.0


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0garbage" * 10])
def test_garbage_bytes_raise_decode_error(data):
    with pytest.raises(DecodeError):
        train_crop(data, 32, random.Random(0))
    with pytest.raises(DecodeError):
        eval_crop(data, 32)


def test_truncated_jpeg_raises_or_decodes(photo):
    """A JPEG cut in half must not crash the worker: DecodeError or an image, nothing else."""
    data = _jpeg(photo)[:5000]
    for fast in (True, False):
        try:
            out = train_crop(data, 32, random.Random(0), fast=fast)
            assert out.shape == (3, 32, 32)
        except DecodeError:
            pass


def test_dct_scale_is_the_smallest_that_covers_the_crop(photo, monkeypatch):
    """The decoded crop covers S x S, and the next smaller n/8 scale would not."""
    import simplejpeg

    import clipkit.data.decode as dec

    data = _jpeg(photo.resize((1024, 768)))
    shapes = []
    real = simplejpeg.decode_jpeg

    def spy(*a, **kw):
        out = real(*a, **kw)
        shapes.append(out.shape[:2])
        return out

    monkeypatch.setattr(dec.simplejpeg, "decode_jpeg", spy)
    for seed in range(20):
        dec.train_crop(data, 224, random.Random(seed))
        top, left, h, w = crop_params(random.Random(seed), 768, 1024, (0.9, 1.0))
        dh, dw = shapes[-1]
        scale = dh / 768
        assert scale < 1 and dw / 1024 == scale  # reduced-size decode happened
        assert h * scale >= 224 - 1 and w * scale >= 224 - 1  # crop still covers S x S
        smaller = (round(scale * 8) - 1) / 8
        assert h * smaller < 224 or w * smaller < 224  # and no smaller n/8 scale would
