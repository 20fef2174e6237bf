"""Views for image self-supervision: per-paper augmentation recipes on uint8 tensors.

A :class:`ViewRecipe` is one augmentation distribution (random resized crop, flip, colour
jitter, grayscale, Gaussian blur, solarisation); a :class:`ViewSpec` is ``V >= 2`` views, view
``v`` drawn from ``recipes[v % len(recipes)]`` (BYOL's two views differ). Recipes are chosen by
name from :data:`RECIPES`.

The crop box is drawn on the image's header size and the JPEG is decoded once, DCT-scaled to
the smallest size that covers every view's crop (:func:`clipkit.data.decode.crop_boxes`); the
photometric ops then run on the uint8 ``(3, S, S)`` crops with
``torchvision.transforms.v2.functional``, so batches stay uint8 and are normalised on the device.

Randomness: view ``v`` of sample ``key`` draws all its parameters from one fixed-length vector of
uniforms of a ``torch.Generator`` seeded by ``(seed, epoch, key, v)`` (:func:`view_generator`).
A sample's views are therefore a pure function of ``(seed, epoch, key, spec)``, whatever the
worker count, rank or position in the stream, which keeps resume exact. Each parameter has its
own slot in the vector, so switching an op off does not shift the others.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as Fn
from PIL import Image, ImageFilter
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F

from clipkit.data.decode import Box, crop_boxes

# Slots of the per-view uniform vector (see the module docstring).
_RRC_TRIES = 10  # torchvision's get_params tries 10 boxes, then falls back to a centre crop
_U_RRC = 0  # 2 per try: area, log aspect
_U_TOP, _U_LEFT = 20, 21
_U_FLIP = 22
_U_JITTER = 23
_U_FACTORS = 24  # brightness, contrast, saturation, hue
_U_ORDER = 28  # 4 keys whose argsort is the order of the jitter ops (ColorJitter's randperm)
_U_GRAY = 32
_U_BLUR, _U_SIGMA = 33, 34
_U_SOLARIZE = 35
_NUM_U = 36


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation distribution; ops run in the papers' order (fields below).

    Attributes:
        scale: random resized crop area range (fraction of the image).
        ratio: crop aspect ratio range (w / h), drawn log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: colour jitter strengths ``(brightness, contrast, saturation, hue)``, as
            torchvision's ``ColorJitter``: factors uniform in ``[max(0, 1 - x), 1 + x]``, hue
            shift uniform in ``[-h, h]``, the four ops in random order.
        jitter_p: probability of applying the colour jitter.
        gray_p: probability of converting to grayscale (3 channels kept).
        blur_p: probability of a Gaussian blur.
        blur_sigma: blur sigma range in output pixels, drawn uniformly.
        blur_kernel: kernel side as a fraction of the output side ``S`` (SimCLR, BYOL: 10%),
            rounded to the nearest odd number, at least 3. 0: PIL's
            ``GaussianBlur(radius=sigma)`` (no kernel size), as MoCo v2's reference code.
        solarize_p: probability of solarisation (pixels >= threshold are inverted).
        solarize_threshold: solarisation threshold on the 0..255 scale.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: float = 0.1
    solarize_p: float = 0.0
    solarize_threshold: int = 128

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"view recipe: {name} must be in [0, 1], got {p}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"view recipe: scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"view recipe: ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        b, c, s, h = self.jitter
        if min(b, c, s) < 0 or not 0.0 <= h <= 0.5:
            raise ValueError(
                f"view recipe: jitter needs b, c, s >= 0 and 0 <= hue <= 0.5, got {self.jitter}"
            )
        if self.blur_kernel < 0:
            raise ValueError(f"view recipe: blur_kernel must be >= 0, got {self.blur_kernel}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(
                f"view recipe: blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}"
            )
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(
                f"view recipe: solarize_threshold in [0, 256], got {self.solarize_threshold}"
            )

    def kernel_size(self, size: int) -> int:
        """Blur kernel side for output side ``size``: odd, >= 3 (23 at 224 px, 3 at 32 px)."""
        k = int(round(self.blur_kernel * size))
        return max(3, k if k % 2 else k + 1)


@dataclass(frozen=True)
class ViewSpec:
    """``views`` views per image; view ``v`` follows ``recipes[v % len(recipes)]``.

    ``recipes`` is a tuple of :class:`ViewRecipe` or the name of one of :data:`RECIPES`
    (``ViewSpec("moco_v2", 2)`` equals ``view_spec("moco_v2", 2)``).

    Raises:
        ValueError: fewer than 2 views, no recipe, or an unknown recipe name.
    """

    recipes: tuple[ViewRecipe, ...] | str
    views: int = 2
    name: str = "custom"
    # Multi-crop (SwAV, Caron et al. 2020): small crops beside the V views, at their own side
    # (``small_size`` px) and crop scale; small crop j follows recipe(j) with that scale.
    small_views: int = 0
    small_size: int = 0
    small_scale: tuple[float, float] = (0.05, 0.14)

    def __post_init__(self) -> None:
        if isinstance(self.recipes, str):  # a name of RECIPES: ViewSpec("byol", 2)
            if self.recipes not in RECIPES:
                raise ValueError(
                    f"unknown view recipe '{self.recipes}'; valid: {', '.join(sorted(RECIPES))}"
                )
            object.__setattr__(self, "name", self.recipes)
            object.__setattr__(self, "recipes", RECIPES[self.recipes])
        if self.views < 2:
            raise ValueError(
                f"views: contrastive training needs >= 2 views per image, got {self.views}"
            )
        if not self.recipes:
            raise ValueError("views: a view spec needs at least one recipe")
        if self.small_views < 0 or (self.small_views > 0) != (self.small_size > 0):
            raise ValueError(
                f"views: small crops need both a count and a side >= 1 "
                f"(small_views={self.small_views}, small_size={self.small_size})"
            )

    def small_recipe(self, j: int) -> ViewRecipe:
        """The recipe of small crop ``j``: view ``j``'s with the small crop scale."""
        return replace(self.recipe(j), scale=self.small_scale)

    def recipe(self, view: int) -> ViewRecipe:
        """The recipe of view ``view``."""
        recipes = self.recipes
        assert not isinstance(recipes, str)  # resolved in __post_init__
        return recipes[view % len(recipes)]


# The papers' recipes. Strengths follow each paper's appendix; the colour jitter of SimCLR is
# "strength s" = (0.8s, 0.8s, 0.8s, 0.2s).
RECIPES: dict[str, tuple[ViewRecipe, ...]] = {
    # SimCLR, Chen et al. 2020 (arXiv 2002.05709), App. B.9 CIFAR-10: crop scale (0.08, 1),
    # flip, colour distortion s = 0.5 applied with p 0.8, grayscale p 0.2, no Gaussian blur
    # (32 px images are already blurry). The ImageNet recipe adds blur p 0.5 (kernel 10% of S).
    "simclr": (
        ViewRecipe(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2),
    ),
    # SimCLR's ImageNet recipe (App. A): s = 1.0, blur p 0.5 with sigma (0.1, 2.0).
    "simclr_imagenet": (
        ViewRecipe(
            scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5
        ),
    ),
    # MoCo v2, Chen et al. 2020 (arXiv 2003.04297) and its reference code (moco/main_moco.py,
    # aug_plus): RandomResizedCrop scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8,
    # grayscale p 0.2, GaussianBlur sigma (0.1, 2.0) p 0.5 (PIL's radius blur: moco/loader.py),
    # flip p 0.5.
    "moco_v2": (
        ViewRecipe(
            scale=(0.2, 1.0),
            jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8,
            gray_p=0.2,
            blur_p=0.5,
            blur_kernel=0.0,
        ),
    ),
    # SLIP, Mu et al. 2021 (arXiv 2112.12750), the SimCLR views of its image tower: crop
    # (0.08, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8 ("not strengthened"), grayscale p 0.2,
    # MoCo's PIL blur sigma (0.1, 2.0) p 0.5, flip. Flip last in SLIP's composition, first
    # here: it commutes with the photometric ops, so the distribution is the same.
    "slip": (
        ViewRecipe(
            scale=(0.08, 1.0),
            jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8,
            gray_p=0.2,
            blur_p=0.5,
            blur_kernel=0.0,
        ),
    ),
    # BYOL, Grill et al. 2020 (arXiv 2006.07733), Table 6: asymmetric views. Both: crop
    # (0.08, 1), flip 0.5, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, blur sigma
    # (0.1, 2.0); view 1 blur p 1.0, no solarisation; view 2 blur p 0.1, solarisation p 0.2.
    "byol": (
        ViewRecipe(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0),
        ViewRecipe(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2),
    ),
    # SwAV, Caron et al. 2020 (arXiv 2006.09882), App. A: high-resolution crops scale
    # (0.14, 1), flip, colour distortion s = 1.0 (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2,
    # Gaussian blur sigma (0.1, 2.0) p 0.5.
    "swav": (
        ViewRecipe(
            scale=(0.14, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5
        ),
    ),
}


def view_spec(name: str, views: int = 2) -> ViewSpec:
    """The recipe named ``name`` from :data:`RECIPES`, with ``views`` views per image.

    Args:
        name: a key of :data:`RECIPES` (``simclr``, ``simclr_imagenet``, ``moco_v2``, ``slip``,
            ``byol``).
        views: views per image ``V`` (>= 2).

    Returns:
        A :class:`ViewSpec`.

    Raises:
        ValueError: an unknown name (listing the valid ones) or ``views < 2``.

    Example:
        >>> view_spec("byol").recipe(1).solarize_p
        0.2
    """
    return ViewSpec(name, views)


def view_generator(seed: int, epoch: int, key: str, view: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, epoch, key, view)`` (blake2b: stable across processes)."""
    digest = hashlib.blake2b(f"views/{seed}/{epoch}/{key}/{view}".encode(), digest_size=8)
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


@dataclass
class ViewParams:
    """The drawn parameters of one view (``None``: op not applied)."""

    box: Box  # (top, left, h, w) in original pixels
    flip: bool
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation, hue
    order: list[int] = field(default_factory=list)  # order of the 4 jitter ops
    gray: bool = False
    sigma: float | None = None
    solarize: bool = False


def _lerp(u: float, lo: float, hi: float) -> float:
    return lo + (hi - lo) * u


def rrc_box(u: list[float], height: int, width: int, recipe: ViewRecipe) -> Box:
    """torchvision's ``RandomResizedCrop.get_params`` driven by the uniforms ``u``."""
    area = height * width
    log_lo, log_hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    for t in range(_RRC_TRIES):
        target = area * _lerp(u[_U_RRC + 2 * t], *recipe.scale)
        aspect = math.exp(_lerp(u[_U_RRC + 2 * t + 1], log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # randint(0, H - h) inclusive, as torch.randint(0, H - h + 1).
            top = min(int(u[_U_TOP] * (height - h + 1)), height - h)
            left = min(int(u[_U_LEFT] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < recipe.ratio[0]:
        w, h = width, int(round(width / recipe.ratio[0]))
    elif in_ratio > recipe.ratio[1]:
        h, w = height, int(round(height * recipe.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(gen: torch.Generator, height: int, width: int, recipe: ViewRecipe) -> ViewParams:
    """All of one view's random choices, from one vector of ``_NUM_U`` uniforms of ``gen``."""
    u = torch.rand(_NUM_U, generator=gen, dtype=torch.float64).tolist()
    jitter = None
    order: list[int] = []
    if u[_U_JITTER] < recipe.jitter_p and any(recipe.jitter):
        b, c, s, h = recipe.jitter
        f = u[_U_FACTORS : _U_FACTORS + 4]
        jitter = (
            _lerp(f[0], max(0.0, 1 - b), 1 + b),
            _lerp(f[1], max(0.0, 1 - c), 1 + c),
            _lerp(f[2], max(0.0, 1 - s), 1 + s),
            _lerp(f[3], -h, h),
        )
        keys = u[_U_ORDER : _U_ORDER + 4]
        order = sorted(range(4), key=keys.__getitem__)
    return ViewParams(
        box=rrc_box(u, height, width, recipe),
        flip=u[_U_FLIP] < recipe.flip_p,
        jitter=jitter,
        order=order,
        gray=u[_U_GRAY] < recipe.gray_p,
        sigma=_lerp(u[_U_SIGMA], *recipe.blur_sigma) if u[_U_BLUR] < recipe.blur_p else None,
        solarize=u[_U_SOLARIZE] < recipe.solarize_p,
    )


def apply_params(img: torch.Tensor, p: ViewParams, recipe: ViewRecipe) -> torch.Tensor:
    """The photometric ops of one view on a uint8 crop ``(3, S, S)``; returns uint8 (3, S, S)."""
    if p.flip:
        img = F.horizontal_flip(img)
    if p.jitter is not None:
        b, c, s, h = p.jitter
        b_on, c_on, s_on, h_on = (x > 0 for x in recipe.jitter)  # ColorJitter skips 0 strengths
        for op in p.order:
            if op == 0 and b_on:
                img = F.adjust_brightness(img, b)
            elif op == 1 and c_on:
                img = F.adjust_contrast(img, c)
            elif op == 2 and s_on:
                img = F.adjust_saturation(img, s)
            elif op == 3 and h_on:
                img = _adjust_hue(img, h)
    if p.gray:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if p.sigma is not None:
        if recipe.blur_kernel > 0:
            img = _gaussian_blur(img, recipe.kernel_size(img.shape[-1]), p.sigma)
        else:
            img = _pil_blur(img, p.sigma)
    if p.solarize:
        img = F.solarize(img, recipe.solarize_threshold)
    return img


def _adjust_hue(img: torch.Tensor, hue: float) -> torch.Tensor:
    """torchvision's PIL hue shift (uint8 HSV, hue channel shifted modulo 256) on ``(3, S, S)``.

    The PIL path is what PIL-image pipelines (SimCLR's, MoCo's and lightly's) run; on small
    images it is 2-3x faster than the tensor path's float HSV round trip, which was ~40% of a
    CIFAR view's cost. Pixels differ from the tensor path by HSV quantisation (mean ~1.5 / 255).
    """
    pil = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))  # (S, S, 3)
    out = np.array(TF.adjust_hue(pil, hue))  # (S, S, 3) uint8, writable
    return torch.from_numpy(out).permute(2, 0, 1)  # (3, S, S)


def _gaussian_blur(img: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of a uint8 ``(3, S, S)`` as two 1-D passes (torchvision's kernel and reflect
    padding; within 1/255 of ``v2.functional.gaussian_blur``, 4x faster at 224 px with k = 23)."""
    half = (k - 1) * 0.5
    w = torch.exp(-0.5 * (torch.linspace(-half, half, k) / sigma) ** 2)
    w = w / w.sum()  # (k,)
    x = Fn.pad(img.float().unsqueeze(1), (k // 2,) * 4, mode="reflect")  # (3, 1, S+k-1, S+k-1)
    x = Fn.conv2d(Fn.conv2d(x, w.view(1, 1, 1, k)), w.view(1, 1, k, 1))  # (3, 1, S, S)
    return x.squeeze(1).round_().clamp_(0, 255).to(torch.uint8)


def _pil_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """PIL's ``GaussianBlur(radius=sigma)`` (extended box passes) of a uint8 ``(3, S, S)``."""
    pil = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))  # (S, S, 3)
    out = np.array(pil.filter(ImageFilter.GaussianBlur(radius=sigma)))  # (S, S, 3) uint8
    return torch.from_numpy(out).permute(2, 0, 1)  # (3, S, S)


def view_params(
    spec: ViewSpec, seed: int, epoch: int, key: str, height: int, width: int
) -> list[ViewParams]:
    """The parameters of every view of sample ``key`` on a ``height x width`` image: the V
    views, then the small crops (seeded as views ``V, V + 1, ...``)."""
    recipes = [spec.recipe(v) for v in range(spec.views)]
    recipes += [spec.small_recipe(j) for j in range(spec.small_views)]
    return [
        draw_params(view_generator(seed, epoch, key, v), height, width, r)
        for v, r in enumerate(recipes)
    ]


def make_views(
    data: bytes,
    size: int,
    spec: ViewSpec,
    *,
    seed: int,
    epoch: int,
    key: str,
    fast: bool = True,
) -> torch.Tensor:
    """Decode an image once and return its ``V`` augmented views.

    Args:
        data: encoded image bytes.
        size: output side ``S``.
        spec: the views (recipes and ``V``).
        seed, epoch, key: with the view index, the seed of each view's parameters.
        fast: DCT-scaled JPEG decoding (see :mod:`clipkit.data.decode`).

    Returns:
        uint8 ``(V, 3, S, S)``.

    Raises:
        clipkit.data.decode.DecodeError: undecodable bytes.

    Example:
        >>> spec = view_spec("simclr")
        >>> v = make_views(jpeg, 32, spec, seed=0, epoch=0, key="a/0")  # doctest: +SKIP
        >>> v.shape, v.dtype  # doctest: +SKIP
        (torch.Size([2, 3, 32, 32]), torch.uint8)
    """
    return all_views(data, size, spec, seed=seed, epoch=epoch, key=key, fast=fast)[1]


def all_views(
    data: bytes,
    size: int,
    spec: ViewSpec,
    *,
    seed: int,
    epoch: int,
    key: str,
    fast: bool = True,
    crops: Callable[[int, int], list[Box]] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Plain crops (no photometric ops), the ``V`` views and the small crops of one image, from
    ONE decode.

    SLIP trains on the caption's crop and two SimCLR views of the same image: the JPEG is
    DCT-scaled once to the smallest size that covers every box (crops and views).

    Args:
        data, size, spec, seed, epoch, key, fast: as :func:`make_views`.
        crops: ``(height, width) -> [(top, left, h, w), ...]`` boxes of the plain crops, called
            once with the image's size before the views' boxes are drawn (the caption crop's
            own random source, so its box is the one the caption loader draws); None: none.

    Returns:
        ``([uint8 (3, S, S) per crop box], uint8 (V, 3, S, S) views, uint8 (V_small, 3, s, s)
        small crops or None)``.

    Raises:
        clipkit.data.decode.DecodeError: undecodable bytes.
    """
    params: list[ViewParams] = []
    n_crops = 0

    def boxes(height: int, width: int) -> list[Box]:
        nonlocal n_crops
        plain = crops(height, width) if crops is not None else []
        n_crops = len(plain)
        params.extend(view_params(spec, seed, epoch, key, height, width))
        return plain + [p.box for p in params]

    def side(i: int) -> int:  # crops and views at S, then the small crops at s
        return spec.small_size if i >= n_crops + spec.views else size

    # crops, then V views (3, S, S), then small crops (3, s, s): uint8 each
    out = crop_boxes(data, size, boxes, fast, sizes=side)
    done = [
        apply_params(c, p, spec.recipe(v) if v < spec.views else spec.small_recipe(v - spec.views))
        for v, (c, p) in enumerate(zip(out[n_crops:], params))
    ]
    views = torch.stack(done[: spec.views])  # (V, 3, S, S)
    small = torch.stack(done[spec.views :]) if spec.small_views else None  # (V_small, 3, s, s)
    return out[:n_crops], views, small
