"""open_clip CLIP <-> Hugging Face ``transformers`` ``CLIPModel``, key by key, both ways.

An open_clip ``CLIP`` with a ViT image tower and the standard causal text transformer is the
architecture of ``CLIPModel``: the same blocks (pre-LN, MHA, 4x MLP), class token, learned
positions, ``ln_pre`` / ``ln_post``, linear projections without bias, text pooled at the end
token. The differences are names and layout: open_clip keeps q, k and v in one ``in_proj``
(split into ``q_proj`` / ``k_proj`` / ``v_proj``), stores projections as ``(width, dim)``
matrices used as ``x @ proj`` (HF: ``Linear`` weights, the transpose), and names the activation
by a flag (``quick_gelu``; HF ``hidden_act``). Everything else (layer scale, attentional pooler,
SigLIP's ``logit_bias``, HF text towers, timm or ResNet image towers, ...) has no place in
``CLIPModel``; :func:`hf_refusal` names the first such part.

:func:`write_hf` writes ``config.json`` + ``model.safetensors`` + tokenizer and image-processor
files (no download: every config is built here); :func:`load_hf_clip` reads such a folder (or any
``CLIPModel`` folder with CLIP's vocabulary) back into a :class:`~clipkit.models.DualEncoder`, so
``clipkit eval`` / ``embed`` take it like an open_clip export. Both directions copy tensors only
(split / concatenate / transpose), so the round trip is bit-exact.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from clipkit.models.export_tokenizer import (
    EOT,
    SOT,
    VOCAB_SIZE,
    is_clip_vocab,
    uses_clip_bpe,
    write_clip_tokenizer,
)

HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
HF_PREPROCESSOR = "preprocessor_config.json"
RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL resample codes, as transformers stores them

# Config fields that must keep open_clip's default for the HF architecture to hold; the values
# a CLIPModel can take (width, layers, sizes, ...) are mapped, not listed.
_VISION_FIXED = (
    "ls_init_value", "attentional_pool", "no_ln_pre", "pos_embed_type", "final_ln_after_pool",
    "pool_type", "output_tokens", "act_kwargs", "norm_kwargs", "qk_norm", "scaled_cosine_attn",
    "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "timm_model_name",
)  # fmt: skip
_TEXT_FIXED = (
    "hf_model_name", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "ls_init_value",
    "embed_cls", "pad_id", "no_causal_mask", "final_ln_after_pool", "pool_type", "proj_bias",
    "proj_type", "output_tokens", "act_kwargs", "norm_kwargs", "qk_norm", "scaled_cosine_attn",
    "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
)  # fmt: skip
# Mapped or harmless at inference (dropout of patches is off in eval mode).
_VISION_MAPPED = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}
_VISION_FREE = {"patch_dropout", "attn_pooler_queries", "attn_pooler_heads", "block_type"}
_TEXT_MAPPED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TEXT_FREE = {"eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "block_type"}
_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype", "init_logit_scale"}


def _square(v: Any) -> int | None:
    """``224`` or ``[224, 224]`` -> 224; a non-square pair -> None."""
    if isinstance(v, int):
        return v
    a, b = v
    return int(a) if a == b else None


def hf_refusal(model: Any) -> str:
    """Why ``model`` has no ``CLIPModel`` form (one phrase), or ``""`` when it maps.

    Args:
        model: a :class:`~clipkit.models.DualEncoder`.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.transformer import VisionTransformer

    cfg = model.model_cfg
    vdef, tdef = asdict(CLIPVisionCfg()), asdict(CLIPTextCfg())
    vcfg, tcfg = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "hf_model_name" in tcfg and tcfg["hf_model_name"]:
        return "its text tower is an HF transformers model (CLIPModel has CLIP's text transformer)"
    if vcfg.get("timm_model_name") or not isinstance(model.clip.visual, VisionTransformer):
        kind = vcfg.get("timm_model_name") or type(model.clip.visual).__name__
        return f"its image tower is {kind}, not a ViT (CLIPModel's vision model is a ViT)"
    if type(model.clip) is not CLIP:
        return f"it is an open_clip {type(model.clip).__name__}, not a plain CLIP"
    if model.logit_bias is not None:
        return (
            "it has SigLIP's logit_bias (CLIPModel has none, and SiglipModel's towers - "
            "attention-pool image head, last-token text pooling - are not these)"
        )
    for where, have, fixed, default, known in (
        ("vision_cfg", vcfg, _VISION_FIXED, vdef, _VISION_MAPPED | _VISION_FREE),
        ("text_cfg", tcfg, _TEXT_FIXED, tdef, _TEXT_MAPPED | _TEXT_FREE),
    ):
        for key, value in have.items():
            if key in fixed and value != default[key]:
                return f"{where}.{key}={value!r} (CLIPModel has only {default[key]!r})"
            if key not in fixed and key not in known:
                return f"{where}.{key}={value!r} has no CLIPModel counterpart"
    extra = sorted(set(cfg) - _TOP - {"custom_text"})
    if extra or cfg.get("custom_text"):
        return f"model config key {(extra or ['custom_text'])[0]!r} has no CLIPModel counterpart"
    if _square(vcfg.get("image_size", 224)) is None or _square(vcfg.get("patch_size", 16)) is None:
        return "its image or patch size is not square (CLIPModel takes one size)"
    if model.clip.visual.proj is None or model.clip.text_projection is None:
        return "a tower has no projection (CLIPModel always projects)"
    if not isinstance(model.clip.text_projection, torch.nn.Parameter):
        return "its text projection is a Linear layer (CLIPModel's has no bias)"
    why = uses_clip_bpe(model)
    if why:
        return why
    pp = model.clip.visual.preprocess_cfg
    if pp.get("resize_mode", "shortest") == "longest":
        return "its preprocessing resizes the longest side and pads (CLIPImageProcessor cannot)"
    if pp.get("interpolation", "bicubic") not in RESAMPLE:
        return f"its preprocessing interpolation {pp.get('interpolation')!r} has no PIL code"
    return ""


def hf_config(model: Any) -> dict[str, Any]:
    """``CLIPConfig`` fields for ``model`` (which :func:`hf_refusal` accepts)."""
    cfg = model.model_cfg
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"  # open_clip: QuickGELU or nn.GELU
    vw, tw = int(v.get("width", 768)), int(t.get("width", 512))
    vision = {
        "hidden_size": vw,
        "intermediate_size": int(vw * v.get("mlp_ratio", 4.0)),
        "num_hidden_layers": int(v.get("layers", 12)),
        "num_attention_heads": vw // int(v.get("head_width", 64)),
        "image_size": _square(v.get("image_size", 224)),
        "patch_size": _square(v.get("patch_size", 16)),
        "num_channels": 3,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,  # torch.nn.LayerNorm's default, which open_clip uses
        "projection_dim": int(cfg["embed_dim"]),
    }
    text = {
        "vocab_size": int(t.get("vocab_size", VOCAB_SIZE)),
        "hidden_size": tw,
        "intermediate_size": int(tw * t.get("mlp_ratio", 4.0)),
        "num_hidden_layers": int(t.get("layers", 12)),
        "num_attention_heads": int(t.get("heads", 8)),
        "max_position_embeddings": int(t.get("context_length", 77)),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(cfg["embed_dim"]),
        # Pooled at the first end token: open_clip pools at argmax(ids), which is that token
        # (the largest id) whatever the padding.
        "bos_token_id": VOCAB_SIZE - 2,
        "eos_token_id": VOCAB_SIZE - 1,
        "pad_token_id": VOCAB_SIZE - 1,
    }
    scale = float(model.clip.logit_scale.detach())
    return {
        "text_config": text,
        "vision_config": vision,
        "projection_dim": int(cfg["embed_dim"]),
        "logit_scale_init_value": scale,
    }


# ------------------------------------------------------------------------------ the key map
Rule = tuple[str, str, int, bool]  # (open_clip key, HF key, in_proj chunk or -1, transposed)


def _block_rules(oc: str, hf: str) -> list[Rule]:
    rules: list[Rule] = []
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        rules.append((f"{oc}.attn.in_proj_weight", f"{hf}.self_attn.{name}.weight", i, False))
        rules.append((f"{oc}.attn.in_proj_bias", f"{hf}.self_attn.{name}.bias", i, False))
    for a, b in (
        ("attn.out_proj", "self_attn.out_proj"),
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    ):
        for p in ("weight", "bias"):
            rules.append((f"{oc}.{a}.{p}", f"{hf}.{b}.{p}", -1, False))
    return rules


def key_rules(vision_layers: int, text_layers: int) -> list[Rule]:
    """Every open_clip CLIP tensor and where it goes in ``CLIPModel``'s state dict."""
    v, t = "vision_model", "text_model"
    rules: list[Rule] = [
        ("visual.conv1.weight", f"{v}.embeddings.patch_embedding.weight", -1, False),
        ("visual.class_embedding", f"{v}.embeddings.class_embedding", -1, False),
        ("visual.positional_embedding", f"{v}.embeddings.position_embedding.weight", -1, False),
        ("visual.ln_pre.weight", f"{v}.pre_layrnorm.weight", -1, False),  # sic: HF's name
        ("visual.ln_pre.bias", f"{v}.pre_layrnorm.bias", -1, False),
        ("visual.ln_post.weight", f"{v}.post_layernorm.weight", -1, False),
        ("visual.ln_post.bias", f"{v}.post_layernorm.bias", -1, False),
        ("visual.proj", "visual_projection.weight", -1, True),
        ("token_embedding.weight", f"{t}.embeddings.token_embedding.weight", -1, False),
        ("positional_embedding", f"{t}.embeddings.position_embedding.weight", -1, False),
        ("ln_final.weight", f"{t}.final_layer_norm.weight", -1, False),
        ("ln_final.bias", f"{t}.final_layer_norm.bias", -1, False),
        ("text_projection", "text_projection.weight", -1, True),
        ("logit_scale", "logit_scale", -1, False),
    ]
    for i in range(vision_layers):
        rules += _block_rules(f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}")
    for i in range(text_layers):
        rules += _block_rules(f"transformer.resblocks.{i}", f"{t}.encoder.layers.{i}")
    return rules


def to_hf_state(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """open_clip state dict -> ``CLIPModel`` state dict (exact copies).

    Raises:
        ValueError: a tensor of ``state`` no rule places (the architecture does not map).
    """
    out: dict[str, torch.Tensor] = {}
    for oc, hf, chunk, transposed in rules:
        x = state[oc]
        if chunk >= 0:
            x = x.chunk(3, dim=0)[chunk]  # in_proj rows: q, k, v
        out[hf] = (x.t() if transposed else x).detach().contiguous().clone()
    left = sorted(set(state) - {r[0] for r in rules})
    if left:
        raise ValueError(f"open_clip tensor {left[0]!r} has no CLIPModel counterpart")
    return out


def from_hf_state(state: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """``CLIPModel`` state dict -> open_clip state dict (the inverse of :func:`to_hf_state`)."""
    parts: dict[str, list[torch.Tensor | None]] = {}
    out: dict[str, torch.Tensor] = {}
    for oc, hf, chunk, transposed in rules:
        if hf not in state:
            raise ValueError(f"CLIPModel weights lack {hf!r}")
        x = state[hf].t() if transposed else state[hf]
        if chunk >= 0:
            parts.setdefault(oc, [None, None, None])[chunk] = x
        else:
            out[oc] = x.contiguous()
    for oc, (q, k, v) in parts.items():
        out[oc] = torch.cat([q, k, v], dim=0)  # type: ignore[list-item]
    return out


# ------------------------------------------------------------------------------ writing
def image_processor_config(pp: dict[str, Any]) -> dict[str, Any]:
    """``preprocessor_config.json`` for open_clip's eval preprocessing ``pp`` (shortest/squash)."""
    h, w = (pp["size"], pp["size"]) if isinstance(pp["size"], int) else pp["size"]
    squash = pp.get("resize_mode", "shortest") == "squash"
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"height": h, "width": w} if squash else {"shortest_edge": h},
        "resample": RESAMPLE[pp.get("interpolation", "bicubic")],
        "do_center_crop": not squash,
        "crop_size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pp["mean"]),
        "image_std": list(pp["std"]),
        "do_convert_rgb": True,
    }


def write_hf(model: Any, out: Path) -> None:
    """Write ``model`` as a ``CLIPModel`` + ``CLIPProcessor`` folder into ``out`` (existing).

    Raises:
        ValueError: the architecture does not map (:func:`hf_refusal`'s reason).
    """
    from safetensors.torch import save_file
    from transformers import CLIPConfig

    why = hf_refusal(model)
    if why:
        raise ValueError(f"no Hugging Face CLIPModel form: {why}")
    fields = hf_config(model)
    rules = key_rules(fields["vision_config"]["num_hidden_layers"],
                      fields["text_config"]["num_hidden_layers"])  # fmt: skip
    state = to_hf_state(model.clip.state_dict(), rules)
    config = CLIPConfig(**fields)
    config.architectures = ["CLIPModel"]
    config.to_json_file(str(out / HF_CONFIG))
    save_file(state, str(out / HF_WEIGHTS), metadata={"format": "pt"})
    write_clip_tokenizer(out, fields["text_config"]["max_position_embeddings"])
    pp = image_processor_config(dict(model.clip.visual.preprocess_cfg))
    (out / HF_PREPROCESSOR).write_text(json.dumps(pp, indent=2))


# ------------------------------------------------------------------------------ reading
def is_hf_clip(folder: Path) -> bool:
    """Whether ``folder`` holds a transformers ``CLIPModel`` (``config.json`` of type clip)."""
    path = folder / HF_CONFIG
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def _preprocess_from_hf(folder: Path) -> dict[str, Any]:
    """open_clip ``create_model_and_transforms`` image kwargs from ``preprocessor_config.json``.

    Raises:
        ValueError: settings open_clip's eval transform cannot reproduce.
    """
    path = folder / HF_PREPROCESSOR
    if not path.is_file():
        raise ValueError(f"{folder}: a CLIPModel folder without {HF_PREPROCESSOR}")
    p = json.loads(path.read_text())
    size, crop = p.get("size", {}), p.get("crop_size", {})
    interp = {v: k for k, v in RESAMPLE.items()}.get(p.get("resample", 3))
    mode = None
    if "shortest_edge" in size and p.get("do_center_crop", True):
        if crop != {"height": size["shortest_edge"], "width": size["shortest_edge"]}:
            mode = None  # resize then a smaller crop: not open_clip's eval transform
        else:
            mode = "shortest"
    elif {"height", "width"} <= set(size) and not p.get("do_center_crop", False):
        mode = "squash"
    ok = (
        mode is not None
        and interp is not None
        and p.get("do_resize", True)
        and p.get("do_rescale", True)
        and abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) < 1e-12
        and p.get("do_normalize", True)
    )
    if not ok:
        raise ValueError(
            f"{path}: preprocessing open_clip cannot reproduce (size {size}, crop {crop}, "
            f"resample {p.get('resample')})"
        )
    return {
        "image_mean": tuple(p["image_mean"]),
        "image_std": tuple(p["image_std"]),
        "image_interpolation": interp,
        "image_resize_mode": mode,
    }


def load_hf_clip(folder: str | Path) -> Any:
    """A :class:`~clipkit.models.DualEncoder` from a transformers ``CLIPModel`` folder.

    The inverse of :func:`write_hf`: the config becomes an open_clip model config, the weights
    are placed back key by key, the tokenizer is open_clip's (the folder's vocabulary must be
    CLIP's BPE) and the image preprocessing is read from ``preprocessor_config.json``.

    Raises:
        ValueError: missing files, another vocabulary, or preprocessing open_clip cannot do.
    """
    import open_clip
    from safetensors.torch import load_file

    from clipkit.models.dual_encoder import DualEncoder, _quiet_random_init, _register

    p = Path(folder).expanduser()
    hf = json.loads((p / HF_CONFIG).read_text())
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    weights = p / HF_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{p}: a CLIPModel folder without {HF_WEIGHTS}")
    if not is_clip_vocab(p):
        raise ValueError(f"{p}: its tokenizer vocabulary is not CLIP's BPE ({SOT}..{EOT})")
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise ValueError(f"{p}: hidden_act {sorted(acts)} (open_clip takes quick_gelu or gelu)")
    width = int(v.get("hidden_size", 768))
    cfg: dict[str, Any] = {
        "embed_dim": int(hf.get("projection_dim", 512)),
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": {
            "image_size": int(v.get("image_size", 224)),
            "layers": int(v.get("num_hidden_layers", 12)),
            "width": width,
            "head_width": width // int(v.get("num_attention_heads", 12)),
            "mlp_ratio": int(v.get("intermediate_size", 3072)) / width,
            "patch_size": int(v.get("patch_size", 32)),
        },
        "text_cfg": {
            "context_length": int(t.get("max_position_embeddings", 77)),
            "vocab_size": int(t.get("vocab_size", VOCAB_SIZE)),
            "width": int(t.get("hidden_size", 512)),
            "heads": int(t.get("num_attention_heads", 8)),
            "layers": int(t.get("num_hidden_layers", 12)),
            "mlp_ratio": int(t.get("intermediate_size", 2048)) / int(t.get("hidden_size", 512)),
        },
    }
    kwargs = _preprocess_from_hf(p)
    key = _register(p.name or "hf", cfg)
    with _quiet_random_init():
        clip, pp_train, pp_eval = open_clip.create_model_and_transforms(key, **kwargs)
    rules = key_rules(cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"])
    state = from_hf_state(load_file(str(weights)), rules)
    missing, unexpected = clip.load_state_dict(state, strict=False)
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise ValueError(f"{weights} does not fit its config.json (key {bad!r})")
    tokenizer = open_clip.get_tokenizer(key)
    return DualEncoder(clip, cfg, tokenizer, pp_train, pp_eval, name=str(p))
