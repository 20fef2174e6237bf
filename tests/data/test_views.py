"""Views for self-supervision: recipe rates and ranges, seeding, exact resume, image-only inputs."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from clipkit.config.schema import DataConfig
from clipkit.data import build_train_loader
from clipkit.data.views import (
    RECIPES,
    ViewRecipe,
    ViewSpec,
    make_views,
    view_generator,
    view_params,
    view_spec,
)

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
PER_CLASS = 12  # members per class in the tar cut from CIFAR-10's train.tar (120 images)


# -- inputs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_tar(data_root: Path, tmp_path_factory) -> Path:
    """An ImageFolder tar (``./<class>/<name>.jpg``) of the first PER_CLASS images per class."""
    from clipkit.data.tarscan import read_member, scan_tar

    out = tmp_path_factory.mktemp("cifar") / "train.tar"
    taken: dict[str, int] = {}
    with tarfile.open(out, "w") as tf:
        for m in scan_tar(data_root / "cifar10" / "train.tar"):
            cls = m.name.split("/", 1)[0]
            if taken.get(cls, 0) >= PER_CLASS:
                continue
            taken[cls] = taken.get(cls, 0) + 1
            data = read_member(m)
            info = tarfile.TarInfo(f"./{m.name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(scope="module")
def image_only_shards(photos, tmp_path_factory) -> Path:
    """4 WebDataset shards x 10 samples with only a ``jpg`` field (no caption, no label)."""
    out = tmp_path_factory.mktemp("image_only")
    for s in range(4):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as tw:
            for i in range(10):
                tw.write({"__key__": f"{s}_{i:03d}", "jpg": photos[(s * 10 + i) % len(photos)]})
    return out


def _loader(spec: str, *, workers=2, batch=8, seed=5, views=None, **cfg):
    c = DataConfig(train=spec, workers=workers, **{"shuffle_buffer": 16, **cfg})
    return build_train_loader(
        c,
        tokenizer=None,
        image_size=32,
        mean=MEAN,
        std=STD,
        batch_size=batch,
        seed=seed,
        views=views or view_spec("simclr"),
    )


def _by_key(batches) -> dict[str, torch.Tensor]:
    """key -> uint8 (V, 3, S, S) over all batches."""
    out = {}
    for b in batches:
        for i, k in enumerate(b["key"]):
            out[k] = b["views"][:, i]
    return out


# -- recipes --------------------------------------------------------------------------------------
def _within(k: int, n: int, p: float) -> bool:
    """Binomial tolerance: |k/n - p| <= 5 standard deviations (two-sided ~6e-7 per check);
    exact when p is 0 or 1."""
    if p in (0.0, 1.0):
        return k == round(p * n)
    return abs(k / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_rates_and_ranges(name):
    spec = view_spec(name)
    n, H, W = 3000, 60, 80  # parameters only: no image is decoded
    per_view: list[list] = [[], []]
    for i in range(n):
        for v, p in enumerate(view_params(spec, 0, 0, f"k{i}", H, W)):
            per_view[v].append(p)
    for v, params in enumerate(per_view):
        r = spec.recipe(v)
        for attr, rate in (
            ("flip", r.flip_p),
            ("jitter", r.jitter_p),
            ("gray", r.gray_p),
            ("sigma", r.blur_p),
            ("solarize", r.solarize_p),
        ):
            k = sum(
                bool(getattr(p, attr))
                if attr in ("flip", "gray", "solarize")
                else getattr(p, attr) is not None
                for p in params
            )
            assert _within(k, n, rate), f"{name} view {v}: {attr} {k}/{n} vs p={rate}"
        fallback = 0
        for p in params:
            top, left, h, w = p.box
            assert top >= 0 and top + h <= H and left >= 0 and left + w <= W
            if p.jitter is not None:
                b, c, s, hue = p.jitter
                jb, jc, js, jh = r.jitter
                assert 1 - jb <= b <= 1 + jb and 1 - jc <= c <= 1 + jc and 1 - js <= s <= 1 + js
                assert -jh <= hue <= jh and sorted(p.order) == [0, 1, 2, 3]
            if p.sigma is not None:
                assert r.blur_sigma[0] <= p.sigma <= r.blur_sigma[1]
            frac, ratio = h * w / (H * W), w / h
            # Rounding to whole pixels widens the ranges by about a pixel.
            lo_ok = r.scale[0] * 0.9 <= frac <= r.scale[1]
            if lo_ok and r.ratio[0] * 0.95 <= ratio <= r.ratio[1] * 1.05:
                continue
            fallback += 1  # torchvision's centre-crop fallback after 10 failed tries
            assert (h, w) == (H, W)
        assert fallback < 0.02 * n
        # The crop area spreads over the range (large boxes fail the fit more often, so the
        # top of the range is reached less often than the bottom).
        areas = sorted(p.box[2] * p.box[3] / (H * W) for p in params)
        span = r.scale[1] - r.scale[0]
        assert (
            areas[n // 20] < r.scale[0] + 0.1 * span and areas[-n // 20] > r.scale[0] + 0.6 * span
        )


def test_byol_views_differ_and_recipes_match_the_papers():
    byol = view_spec("byol")
    assert (byol.recipe(0).blur_p, byol.recipe(0).solarize_p) == (1.0, 0.0)
    assert (byol.recipe(1).blur_p, byol.recipe(1).solarize_p) == (0.1, 0.2)
    assert byol.recipe(2) == byol.recipe(0)  # V > 2 cycles through the recipes
    simclr, moco = view_spec("simclr").recipe(0), view_spec("moco_v2").recipe(0)
    assert (
        simclr.blur_p == 0 and simclr.scale == (0.08, 1.0) and simclr.jitter == (0.4, 0.4, 0.4, 0.1)
    )
    assert moco.scale == (0.2, 1.0) and moco.blur_p == 0.5 and moco.blur_sigma == (0.1, 2.0)
    assert moco.blur_kernel == 0  # PIL's radius blur, as MoCo's reference code
    assert ViewRecipe(blur_kernel=0.1).kernel_size(224) == 23  # SimCLR: 10% of the side, odd
    assert ViewRecipe().kernel_size(32) == 3


def test_ops_act_on_pixels(photos):
    """Certain ops (p = 1) do what they say on the decoded uint8 crops."""
    whole = dict(scale=(1.0, 1.0), ratio=(0.01, 100.0), jitter_p=0.0, gray_p=0.0)
    plain = ViewSpec((ViewRecipe(**whole, flip_p=0.0),))
    flipped = ViewSpec((ViewRecipe(**whole, flip_p=1.0),))
    gray = ViewSpec((ViewRecipe(**{**whole, "gray_p": 1.0}, flip_p=0.0),))
    sol = ViewSpec((ViewRecipe(**whole, flip_p=0.0, solarize_p=1.0, solarize_threshold=128),))
    kw = dict(seed=0, epoch=0, key="x")
    a = make_views(photos[0], 32, plain, **kw)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(make_views(photos[0], 32, flipped, **kw), a.flip(-1))
    g = make_views(photos[0], 32, gray, **kw)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    s = make_views(photos[0], 32, sol, **kw)
    assert torch.equal(s, torch.where(a >= 128, 255 - a, a))


def test_blur_matches_torchvision():
    from torchvision.transforms.v2 import functional as F

    from clipkit.data.views import _gaussian_blur

    x = torch.randint(
        0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    for k, sigma in ((3, 0.1), (5, 1.0), (23, 2.0)):
        ref = F.gaussian_blur(x, [k, k], [sigma, sigma]).int()
        assert (_gaussian_blur(x, k, sigma).int() - ref).abs().max() <= 1
    # blur_kernel = 0: PIL's GaussianBlur(radius=sigma), through the recipe.
    from PIL import Image, ImageFilter

    from clipkit.data.views import ViewParams, apply_params

    p = ViewParams(box=(0, 0, 40, 40), flip=False, jitter=None, sigma=1.5)
    got = apply_params(x, p, ViewRecipe(blur_kernel=0.0))
    pil = Image.fromarray(x.permute(1, 2, 0).numpy().copy()).filter(ImageFilter.GaussianBlur(1.5))
    assert torch.equal(got, torch.from_numpy(np.array(pil)).permute(2, 0, 1))


def test_fewer_than_two_views_is_one_line():
    for make in (lambda: view_spec("simclr", views=1), lambda: ViewSpec(RECIPES["simclr"], 0)):
        with pytest.raises(ValueError, match=">= 2 views") as err:
            make()
        assert "\n" not in str(err.value)
    for unknown in (lambda: view_spec("simsiam"), lambda: ViewSpec("simsiam")):
        with pytest.raises(ValueError, match="valid: byol, moco_v2, simclr, simclr_imagenet"):
            unknown()
    assert ViewSpec("moco_v2", 3) == view_spec("moco_v2", 3)


def test_views_are_seeded_by_seed_epoch_key_view(photos):
    spec = view_spec("moco_v2", views=3)
    a = make_views(photos[1], 32, spec, seed=1, epoch=2, key="k")
    assert torch.equal(a, make_views(photos[1], 32, spec, seed=1, epoch=2, key="k"))
    assert not torch.equal(a[0], a[1])  # views of one image differ
    for other in (
        dict(seed=2, epoch=2, key="k"),
        dict(seed=1, epoch=3, key="k"),
        dict(seed=1, epoch=2, key="j"),
    ):
        assert not torch.equal(a, make_views(photos[1], 32, spec, **other))
    g = torch.rand(4, generator=view_generator(1, 2, "k", 0))
    assert torch.equal(g, torch.rand(4, generator=view_generator(1, 2, "k", 0)))


# -- loader ---------------------------------------------------------------------------------------
def test_imagefolder_tar_loads_as_views_with_labels(cifar_tar):
    loader = _loader(str(cifar_tar), workers=2, batch=8)
    assert loader.classes[:2] == ["airplane", "automobile"] and len(loader.classes) == 10
    # Two readers of 60 images each, drop_last per reader: 2 x 7 batches.
    assert loader.num_batches == 2 * (10 * PER_CLASS // 2 // 8)
    batches = list(loader)
    b = batches[0]
    assert b["views"].shape == (2, 8, 3, 32, 32) and b["views"].dtype == torch.uint8
    assert b["cls"].shape == (8,) and "text" not in b and "image" not in b
    for batch in batches:  # the label is the key's folder
        assert [loader.classes[c] for c in batch["cls"].tolist()] == [
            k.split("/")[0] for k in batch["key"]
        ]
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == len(keys) == 8 * loader.num_batches  # no image twice in an epoch
    # One permutation per epoch, not the tar's class-major order: batches mix classes.
    assert all(len(set(b["cls"].tolist())) > 2 for b in batches)
    x = loader.normalize(b["views"])  # (V, B, 3, S, S) floats
    assert x.shape == b["views"].shape and x.dtype == torch.float32
    loader.set_epoch(1)
    again = [k for b in loader for k in b["key"]]
    # A new permutation (drop_last leaves out other images this time).
    assert len(set(again)) == len(again) == len(keys) and again != keys


def test_imagefolder_directory_loads_as_views(cifar_tar, tmp_path):
    with tarfile.open(cifar_tar) as tf:
        tf.extractall(tmp_path / "folder", filter="data")
    loader = _loader(str(tmp_path / "folder"), workers=0, batch=10)
    b = next(iter(loader))
    assert b["views"].shape == (2, 10, 3, 32, 32) and len(loader.classes) == 10
    # Same key, same pixels as from the tar: views depend on (seed, epoch, key, view) only.
    from_tar = _by_key(_loader(str(cifar_tar), workers=0, batch=10))
    for i, k in enumerate(b["key"]):
        assert torch.equal(b["views"][:, i], from_tar[k])


def test_image_only_shards_load_as_views(image_only_shards):
    loader = _loader(str(image_only_shards / "{00000..00003}.tar"), num_samples=40, batch=5)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 8
    assert all(b["views"].shape == (2, 5, 3, 32, 32) and "cls" not in b for b in batches)
    assert sum(loader.stats.values()) == 0


def test_same_pixels_whatever_the_worker_count(cifar_tar, image_only_shards):
    for spec, kw in (
        (str(cifar_tar), {}),
        (str(image_only_shards / "{00000..00003}.tar"), {"num_samples": 40}),
    ):
        zero = _by_key(_loader(spec, workers=0, batch=4, **kw))
        two = _by_key(_loader(spec, workers=2, batch=4, **kw))
        common = zero.keys() & two.keys()
        assert len(common) >= 0.8 * len(zero)  # drop_last may drop different tails
        for k in common:
            assert torch.equal(zero[k], two[k]), k


def _take(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_mid_epoch_is_exact(cifar_tar, mode):
    kw = {"resampled": True, "num_samples": 96} if mode == "resampled" else {}
    spec = view_spec("byol")
    full = _take(_loader(str(cifar_tar), batch=6, views=spec, **kw))
    half = len(full) // 2
    first = _loader(str(cifar_tar), batch=6, views=spec, **kw)
    head = _take(first, half)
    resumed = _loader(str(cifar_tar), batch=6, views=spec, **kw)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(0)  # the trainer calls this on resume: must not reset the position
    got = head + _take(resumed)
    assert [b["key"] for b in got] == [b["key"] for b in full]
    for a, b in zip(got, full):
        assert torch.equal(a["views"], b["views"]) and torch.equal(a["cls"], b["cls"])


def test_caption_training_on_image_only_input_is_an_error(cifar_tar):
    c = DataConfig(train=str(cifar_tar), workers=0)
    with pytest.raises(ValueError, match="without captions"):
        build_train_loader(
            c, tokenizer=None, image_size=32, mean=MEAN, std=STD, batch_size=4, seed=0
        )


def test_cifar10_train_tar_reads_as_views(data_root):
    """The real 50k-image ImageFolder tar: counted by the header scan, no sizes.json needed."""
    loader = _loader(str(data_root / "cifar10" / "train.tar"), batch=256, workers=2)
    assert loader.num_batches == 2 * (25_000 // 256) and len(loader.classes) == 10
    b = next(iter(loader))
    assert b["views"].shape == (2, 256, 3, 32, 32)
    assert len(set(b["cls"].tolist())) == 10


def test_contact_sheet(cifar_tar, tmp_path):
    from data_tools.views import main

    out = tmp_path / "views.png"
    assert (
        main(
            [
                str(cifar_tar),
                "--recipe",
                "byol",
                "--views",
                "3",
                "--images",
                "4",
                "--scale",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(out).size == (4 * 32, 4 * 32)  # eval crop + 3 views, 4 rows
    assert main([str(cifar_tar), "--views", "1"]) == 2


# -- multi-crop (SwAV) ----------------------------------------------------------------------------
def test_multi_crop_small_views_have_their_side_scale_and_seeds(photos):
    from clipkit.data.views import all_views, view_params

    spec = ViewSpec("swav", 2, small_views=3, small_size=16)
    plain, views, small = all_views(photos[1], 32, spec, seed=1, epoch=0, key="k")
    assert plain == [] and views.shape == (2, 3, 32, 32) and small.shape == (3, 3, 16, 16)
    assert small.dtype == torch.uint8
    # The V views are those of the same spec without small crops (seeds 0..V-1 unchanged).
    assert torch.equal(views, make_views(photos[1], 32, ViewSpec("swav", 2), seed=1, epoch=0,
                                         key="k"))  # fmt: skip
    # Small crops draw boxes of area fraction within small_scale (seeded as views 2, 3, 4).
    params = view_params(spec, 1, 0, "k", 240, 320)
    assert len(params) == 5
    for p in params[2:]:
        top, left, h, w = p.box
        assert 0.05 * 0.999 <= h * w / (240 * 320) <= 0.14 * 1.001
    for bad in (dict(small_views=2), dict(small_size=8), dict(small_views=-1, small_size=8)):
        with pytest.raises(ValueError, match="small crops need"):
            ViewSpec("swav", 2, **bad)


def test_loader_batches_carry_small_views(cifar_tar):
    spec = ViewSpec("swav", 2, small_views=2, small_size=16)
    b = next(iter(_loader(str(cifar_tar), workers=0, batch=4, views=spec)))
    assert b["views"].shape == (2, 4, 3, 32, 32)
    assert b["small_views"].shape == (2, 4, 3, 16, 16) and b["small_views"].dtype == torch.uint8
