"""Image self-supervision models: a backbone by name plus the papers' projection / prediction heads.

Backbones (:func:`build_backbone`), chosen by name from a small explicit registry:

* ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision ResNets without their classifier; with
  ``cifar_stem`` the first conv is 3x3 stride 1 and the max-pool is dropped (the CIFAR variant of
  SimCLR, Chen et al. 2020, Appendix B.9), so 32 px inputs keep a 4 x 4 final map.
* ``open_clip:ARCH``: the vision tower of an open_clip / clipkit architecture (its output is the
  tower's embedding), so SLIP-style and CLIP-initialised backbones share one path.
* ``timm:NAME``: any timm model with its classifier removed (``num_classes=0``).

Heads (:data:`HEADS`): ``simclr`` (Linear-BN-ReLU-Linear, SimCLR), ``moco_v2`` (Linear-ReLU-Linear,
Chen et al. 2020 "Improved baselines"), ``moco_v3`` (3-layer BN MLP projector whose last BN has no
affine, and a 2-layer predictor; Chen, Xie, He 2021), ``byol`` (Linear-BN-ReLU-Linear projector
and a predictor of the same shape; Grill et al. 2020), ``byol_nopred`` (BYOL without its
predictor: the collapsing ablation of the BYOL paper, Table 5), ``barlow_twins`` (3 Linear layers,
BN-ReLU between, as wide as ``proj_dim``; Zbontar et al. 2021) and ``swav`` (Linear-BN-ReLU-Linear
plus ``prototypes`` unit-norm prototype vectors; Caron et al. 2020).

:class:`SSLModel` returns L2-normalised projections (``forward``) and, for the evaluators, raw
backbone features (``encode_image``: kNN and linear probes read the representation before the
projection head, as the papers evaluate).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics: what lightly and solo-learn normalise CIFAR with too.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSL_CONFIG = "ssl_config.json"
SSL_WEIGHTS = "model.safetensors"
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")


def _torchvision_resnet(name: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class _OpenClipVisual(nn.Module):
    """The vision tower of an open_clip architecture, called as a backbone."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        from clipkit.config.schema import ModelConfig
        from clipkit.models.dual_encoder import build_dual_encoder

        enc = build_dual_encoder(ModelConfig(name=arch))
        self.visual = enc.clip.visual
        self.dim = int(self.visual.output_dim)
        self.image_size = enc.image_size  # fixed by the tower's positional embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)  # (B, D)


def build_backbone(name: str, *, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """A backbone and its feature width.

    Args:
        name: ``resnet18|resnet34|resnet50``, ``open_clip:ARCH`` or ``timm:NAME``.
        cifar_stem: torchvision ResNets only: 3x3 stride-1 first conv, no max-pool.

    Returns:
        ``(module mapping (B, 3, S, S) -> (B, F), F)``.

    Raises:
        ValueError: an unknown name (the message lists the valid forms).
    """
    if name in TORCHVISION_RESNETS:
        return _torchvision_resnet(name, cifar_stem)
    if name.startswith("open_clip:"):
        vis = _OpenClipVisual(name.split(":", 1)[1])
        return vis, vis.dim
    if name.startswith("timm:"):
        import timm

        try:
            net = timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=0)
        except RuntimeError as err:  # timm's "Unknown model"
            raise ValueError(f"ssl.backbone={name}: {err}") from None
        return net, int(net.num_features)
    raise ValueError(
        f"unknown ssl.backbone '{name}'; valid: {', '.join(TORCHVISION_RESNETS)}, "
        "open_clip:ARCH, timm:NAME"
    )


def _mlp(dims: list[int], *, bn: bool, last_bn: bool = False) -> nn.Sequential:
    """Linear layers with (BN +) ReLU between them; optionally a non-affine BN at the end."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        followed_by_bn = (bn and not last) or (last and last_bn)
        layers.append(nn.Linear(a, b, bias=not followed_by_bn))  # BN's shift replaces the bias
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def _simclr(f: int, hidden: int, out: int) -> tuple[nn.Module, nn.Module | None]:
    return _mlp([f, hidden, out], bn=True), None


def _moco_v2(f: int, hidden: int, out: int) -> tuple[nn.Module, nn.Module | None]:
    return _mlp([f, hidden, out], bn=False), None


def _moco_v3(f: int, hidden: int, out: int) -> tuple[nn.Module, nn.Module | None]:
    projector = _mlp([f, hidden, hidden, out], bn=True, last_bn=True)
    predictor = _mlp([out, hidden, out], bn=True)
    return projector, predictor


def _byol(f: int, hidden: int, out: int) -> tuple[nn.Module, nn.Module | None]:
    return _mlp([f, hidden, out], bn=True), _mlp([out, hidden, out], bn=True)


def _byol_nopred(f: int, hidden: int, out: int) -> tuple[nn.Module, nn.Module | None]:
    return _mlp([f, hidden, out], bn=True), None


def _barlow_twins(f: int, hidden: int, out: int) -> tuple[nn.Module, nn.Module | None]:
    return _mlp([f, hidden, hidden, out], bn=True), None


# name -> (feature dim, hidden, out) -> (projector, predictor or None). SwAV's projector is
# SimCLR's; its prototypes are built by SSLModel (they need the prototype count).
HEADS: dict[str, Callable[[int, int, int], tuple[nn.Module, nn.Module | None]]] = {
    "simclr": _simclr,
    "moco_v2": _moco_v2,
    "moco_v3": _moco_v3,
    "byol": _byol,
    "byol_nopred": _byol_nopred,
    "barlow_twins": _barlow_twins,
    "swav": _simclr,
}


class SSLModel(nn.Module):
    """Backbone + projector (+ predictor): the student of every image-SSL task.

    Args:
        backbone: name for :func:`build_backbone`.
        head: a :data:`HEADS` name.
        proj_hidden, proj_dim: the projector's hidden and output widths.
        cifar_stem: see :func:`build_backbone`.
        image_size: side of the training / evaluation crops.
        mean, std: normalisation of uint8 images (applied on the device by the task).
        prototypes: SwAV's number of prototypes ``K`` (``head="swav"`` only; 0 otherwise).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        head: str = "simclr",
        proj_hidden: int = 2048,
        proj_dim: int = 128,
        *,
        cifar_stem: bool = True,
        image_size: int = 32,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        prototypes: int = 0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown ssl.head '{head}'; valid: {', '.join(HEADS)}")
        if (head == "swav") != (prototypes > 0):
            raise ValueError(
                f"ssl.prototypes={prototypes}: the swav head needs prototypes >= 1, "
                f"other heads none (ssl.head={head})"
            )
        self.config = {
            "backbone": backbone,
            "head": head,
            "proj_hidden": int(proj_hidden),
            "proj_dim": int(proj_dim),
            "cifar_stem": bool(cifar_stem),
            "image_size": int(image_size),
            "mean": list(mean),
            "std": list(std),
            "prototypes": int(prototypes),
        }
        self.backbone, self.feature_dim = build_backbone(backbone, cifar_stem=cifar_stem)
        fixed = getattr(self.backbone, "image_size", None)
        if fixed is not None and fixed != image_size:
            raise ValueError(f"ssl.image_size={image_size}, but {backbone} takes {fixed} px images")
        self.projector, self.predictor = HEADS[head](self.feature_dim, proj_hidden, proj_dim)
        # SwAV's prototypes: rows kept at unit norm by normalize_prototypes_ (after each step).
        self.prototypes = nn.Linear(proj_dim, prototypes, bias=False) if prototypes else None
        self.normalize_prototypes_()
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`encode_image` (the representation the evaluators read)."""
        return self.feature_dim

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Backbone features ``(B, F)`` of normalised images ``(B, 3, S, S)``."""
        h = self.backbone(image)
        return F.normalize(h, dim=-1) if normalize else h

    def project(self, image: torch.Tensor) -> torch.Tensor:
        """Projections ``(B, P)`` before normalisation (the momentum teacher's output too)."""
        return self.projector(self.backbone(image))

    def forward(
        self,
        image: torch.Tensor,
        predict: bool = False,
        normalize: bool = True,
        scores: bool = False,
        with_projection: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The projection ``(B, P)`` of normalised images ``(B, 3, S, S)``.

        Args:
            predict: through the predictor (BYOL, MoCo v3) when the head has one.
            normalize: L2-normalise the output (Barlow Twins standardises raw projections).
            scores: SwAV: the unit projection's cosine similarity to each prototype ``(B, K)``.
            with_projection: with ``scores``, return ``(scores (B, K), unit projection (B, P))``
                (SwAV's queue stores the projections).
        """
        z = self.project(image)
        if predict and self.predictor is not None:
            z = self.predictor(z)
        if scores:
            if self.prototypes is None:
                raise ValueError(f"ssl.head={self.config['head']} has no prototypes")
            u = F.normalize(z, dim=-1)  # (B, P)
            s = self.prototypes(u)  # (B, K), prototypes unit-norm
            return (s, u) if with_projection else s
        return F.normalize(z, dim=-1) if normalize else z

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """Project the prototypes back to the unit sphere (SwAV, before every step's forward)."""
        if self.prototypes is not None:
            w = self.prototypes.weight  # (K, P)
            w.copy_(F.normalize(w, dim=-1))

    @property
    def preprocess_eval(self) -> Any:
        """PIL image -> normalised ``(3, S, S)`` tensor: resize the short side, centre crop."""
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.image_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def export(self, out_dir: str | Path, extra: dict[str, nn.Module] | None = None) -> Path:
        """Write ``ssl_config.json`` + ``model.safetensors`` (+ ``<name>.safetensors`` per extra,
        e.g. the momentum teacher); :func:`load_ssl_model` reads it back."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / SSL_WEIGHTS))
        for name, mod in (extra or {}).items():
            state = {k: v.detach().cpu().contiguous() for k, v in mod.state_dict().items()}
            save_file(state, str(out / f"{name}.safetensors"))
        (out / SSL_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
        return out


def load_ssl_model(path: str | Path) -> SSLModel:
    """An :class:`SSLModel` from an export folder written by :meth:`SSLModel.export`.

    Raises:
        ValueError: no ``ssl_config.json`` / weights there, or weights that do not fit.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / SSL_CONFIG).is_file() or not (p / SSL_WEIGHTS).is_file():
        raise ValueError(f"{p}: not an SSL export ({SSL_CONFIG} + {SSL_WEIGHTS})")
    cfg = json.loads((p / SSL_CONFIG).read_text())
    model = SSLModel(
        cfg["backbone"],
        cfg["head"],
        cfg["proj_hidden"],
        cfg["proj_dim"],
        cifar_stem=cfg["cifar_stem"],
        image_size=cfg["image_size"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        prototypes=int(cfg.get("prototypes", 0)),  # exports before SwAV have no key
    )
    try:
        model.load_state_dict(load_file(str(p / SSL_WEIGHTS)))
    except RuntimeError as err:
        raise ValueError(f"{p / SSL_WEIGHTS}: does not fit {SSL_CONFIG} ({err})") from None
    return model


__all__ = ["HEADS", "SSLModel", "build_backbone", "load_ssl_model"]
