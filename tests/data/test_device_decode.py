"""data.decode=device: the workers ship JPEG bytes + crop boxes; the main process decodes,
crops and resizes on the training device (nvJPEG on CUDA). Here the device is the CPU (the
same code with torchvision's CPU decoder); bench/gpu_data.sh runs it on a GPU.

Tolerances: pixels against the workers' full-decode path (``fast_decode=False``: PIL decode and
PIL bicubic, open_clip's pixels; the same boxes) within a mean absolute difference of 0.5 / 255
(seen 0.002-0.004: torch's antialiased bicubic is PIL's filter); against a full decode + the same
crop and resize: equal (torchvision and simplejpeg both wrap libjpeg-turbo). The workers' default
DCT-scaled decode differs from both by more (seen 3.6 / 255 at 64 px, 5.2 at 32 px).
"""

from __future__ import annotations

import io
import random

import pytest
import simplejpeg
import torch
from data_helpers import toy_tokenizer, write_shards
from PIL import Image

from clipkit.config.schema import DataConfig
from clipkit.data import build_train_loader
from clipkit.data.decode import crop_params, device_crop_plan, resize_crop, train_crop
from clipkit.data.device_decode import pack, unpack

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _loader(spec: str, *, decode="device", device="cpu", workers=2, batch=4, views=None):
    cfg = DataConfig(train=spec, workers=workers, shuffle_buffer=16, decode=decode)
    return build_train_loader(
        cfg,
        fast_decode=decode == "device",  # the reference: full decode, PIL resize (open_clip)
        tokenizer=toy_tokenizer,
        image_size=32,
        mean=MEAN,
        std=STD,
        batch_size=batch,
        seed=3,
        decode_device=device,
        views=views,
    )


def _spec(d) -> str:
    return str(d / "{00000..00007}.tar")


def test_same_samples_boxes_and_captions_as_the_workers_path(shard_dir):
    dev, cpu = _loader(_spec(shard_dir)), _loader(_spec(shard_dir), decode="workers")
    n = 0
    for a, b in zip(dev, cpu, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["text"], b["text"])
        assert a["image"].shape == b["image"].shape == (4, 3, 32, 32)
        assert a["image"].dtype == torch.uint8
        assert not {"jpeg", "jpeg_offsets", "jpeg_box", "image_rows"} & a.keys()
        assert (a["image"].float() - b["image"].float()).abs().mean() < 0.5
        n += 1
    assert n == dev.num_batches and dev.stats == cpu.stats


def test_pixels_are_the_full_decode_cropped_and_resized(photos):
    data, rng = photos[5], random.Random(7)
    (box, full) = device_crop_plan(data, rng, (0.9, 1.0))
    assert box == crop_params(random.Random(7), *full, (0.9, 1.0))  # same draws as train_crop
    batch = pack([{"jpeg": data, "jpeg_box": (*box, *full)}], 24)
    out = unpack(batch, 24, torch.device("cpu"))["image"]  # (1, 3, 24, 24)
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
    ref = resize_crop(torch.from_numpy(arr).permute(2, 0, 1), box, full, 24)
    assert torch.equal(out[0], ref)


def test_non_jpeg_and_truncated_images_take_the_workers_path(tmp_path, photos):
    png = io.BytesIO()
    Image.open(io.BytesIO(photos[0])).save(png, "PNG")
    assert device_crop_plan(png.getvalue(), random.Random(0), (0.9, 1.0)) is None
    assert device_crop_plan(photos[1][: len(photos[1]) // 2], random.Random(0), (0.9, 1.0)) is None
    # A shard mixing PNGs, a truncated JPEG and JPEGs: PNG rows arrive decoded, the broken one
    # is skipped and counted by the workers as on the CPU path.
    images = list(photos[:16])
    images[3] = images[3][: len(images[3]) // 2]
    write_shards(tmp_path / "jpg", images, 2)
    write_shards(tmp_path / "png", [png.getvalue()] * 16, 2, ext="png", key_offset=100)
    spec = _spec(tmp_path / "jpg") + "::" + _spec(tmp_path / "png")
    dev = list(_loader(spec, batch=2))
    cpu = list(_loader(spec, batch=2, decode="workers"))
    assert [b["key"] for b in dev] == [b["key"] for b in cpu]
    for a, b in zip(dev, cpu, strict=True):
        assert (a["image"].float() - b["image"].float()).abs().mean() < 0.5
    loader = _loader(spec, batch=2)
    for _ in loader:
        pass
    assert loader.stats["corrupt_image"] == 1


def test_a_jpeg_the_device_refuses_is_decoded_on_the_cpu(photos, monkeypatch):
    import clipkit.data.device_decode as dd

    calls = []

    def refuse(datas, device):
        calls.append(len(datas))
        return [None] * len(datas)

    monkeypatch.setattr(dd, "_decode_each", refuse)
    rng = random.Random(1)
    box, full = device_crop_plan(photos[2], rng, (0.9, 1.0))
    bad = b"\xff\xd8" + b"\x00" * 40 + b"\xff\xd9"
    items = [
        {"jpeg": photos[2], "jpeg_box": (*box, *full)},
        {"jpeg": bad, "jpeg_box": (0, 0, 10, 10, 10, 10)},
        {"image": torch.full((3, 24, 24), 7, dtype=torch.uint8)},
    ]
    stats = __import__("collections").Counter()
    out = unpack(pack(items, 24), 24, torch.device("cpu"), stats)["image"]
    ref = train_crop(photos[2], 24, random.Random(1))  # the workers' decode of the same box
    assert calls == [2] and torch.equal(out[0], ref)
    assert out[1].eq(0).all() and out[2].eq(7).all()
    assert stats == {"device_decode_cpu": 1, "device_decode_failed": 1}


def test_resume_is_exact(shard_dir):
    full = [b for b in _loader(_spec(shard_dir))]
    first = _loader(_spec(shard_dir))
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    del it
    again = _loader(_spec(shard_dir))
    again.load_state_dict(state)
    rest = list(again)
    assert [b["key"] for b in head + rest] == [b["key"] for b in full]
    for a, b in zip(head + rest, full, strict=True):
        assert torch.equal(a["image"], b["image"])


def test_config_errors_and_fallback_without_cuda(shard_dir, caplog):
    with pytest.raises(ValueError, match="data.decode='gpu'"):
        _loader(_spec(shard_dir), decode="gpu")
    from clipkit.data.views import view_spec

    with pytest.raises(ValueError, match="data.decode=device applies to caption training"):
        _loader(_spec(shard_dir), views=view_spec("simclr"))
    if not torch.cuda.is_available():
        loader = _loader(_spec(shard_dir), device=None)
        assert "no CUDA device in this process; the workers decode" in caplog.text
        assert not loader.spec.device_decode
        assert next(iter(loader))["image"].shape == (4, 3, 32, 32)
