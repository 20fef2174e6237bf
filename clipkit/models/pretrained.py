"""``model.pretrained``: find open_clip weights on local disk and load them into a built model.

What ``model.pretrained`` may name (:func:`resolve_pretrained`):

* a weights file: ``.pt`` / ``.pth`` / ``.bin`` (``torch.load``: a state dict, a dict with
  ``state_dict``, DDP ``module.`` prefixes) or ``.safetensors``: open_clip's own formats;
* a folder: a clipkit export or open_clip hub folder (``open_clip_config.json`` + weights), a
  clipkit run folder (its ``export/``) or a clipkit checkpoint folder (``model.safetensors``, whose
  ``clip.`` keys are the open_clip model's);
* an open_clip tag of the architecture ``model.name`` (``laion2b_s34b_b79k`` for ``ViT-B-32``),
  looked up in the local caches only: the Hugging Face hub cache and open_clip's URL cache
  (``~/.cache/clip``). Nothing is downloaded: fine-tuning must be reproducible from files on disk,
  and a missed cache is one line naming the tag and the places looked at.

Loading (:func:`load_pretrained`) is strict: the file's keys and shapes must be the model's.
open_clip's ``load_checkpoint`` would resize position embeddings or raise a multi-line
``RuntimeError``; a fine-tune from a different architecture is a mistake to report, not to
patch (issue 16).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Weights files of an export / hub folder, in open_clip's order of preference.
FOLDER_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
SHOW_KEYS = 3  # keys named in a mismatch message


@dataclass(frozen=True)
class Pretrained:
    """Where ``model.pretrained`` points.

    Attributes:
        path: the weights file.
        prefix: key prefix to strip (``clip.`` for a clipkit checkpoint's DualEncoder state).
        tag_cfg: open_clip's pretrained config of a tag (preprocessing, ``quick_gelu``); empty
            for files and folders.
    """

    path: Path
    prefix: str = ""
    tag_cfg: dict[str, Any] = field(default_factory=dict)


def _folder_weights(folder: Path) -> Pretrained | None:
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return Pretrained(folder / name)
    if (folder / "config.yaml").is_file() and (folder / "model.safetensors").is_file():
        return Pretrained(folder / "model.safetensors", prefix="clip.")
    return None


def _tag_candidates(tag_cfg: dict[str, Any]) -> list[Path]:
    """Local places where open_clip's downloader would have left a tag's weights."""
    out: list[Path] = []
    if tag_cfg.get("file"):
        out.append(Path(tag_cfg["file"]).expanduser())
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants

        repo, filename = os.path.split(hub)
        names = [filename] if filename else []
        if not filename or filename.endswith((".bin", ".pth")):
            # open_clip prefers a .safetensors twin of the .bin it names
            base = filename[:-4] if filename else "open_clip_pytorch_model"
            names = [base + ".safetensors", *(names or ["open_clip_pytorch_model.bin"])]
        snaps = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
        found = sorted(snaps.glob("*/")) if snaps.is_dir() else []
        out += [s / n for s in found for n in names] or [snaps / "<revision>" / names[0]]
    if tag_cfg.get("url"):
        out.append(Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"]))
    return out


def resolve_pretrained(spec: str, arch: str) -> Pretrained:
    """The local weights ``model.pretrained=spec`` names (see the module docstring).

    Args:
        spec: a weights file, an export / run / checkpoint folder, or an open_clip tag.
        arch: ``model.name`` (tags are looked up for it).

    Returns:
        A :class:`Pretrained`.

    Raises:
        ValueError: one line: a missing file, a folder without weights, a tag whose weights are
            not cached (naming where it looked), or neither a path nor a tag of ``arch``.

    Example:
        >>> resolve_pretrained("runs/clip_cifar10", "clipkit-cifar").path.name
        'open_clip_model.safetensors'
    """
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(
                f"model.pretrained={spec}: not a weights file (takes {', '.join(WEIGHT_SUFFIXES)})"
            )
        return Pretrained(p)
    if p.is_dir():
        for folder in (p, p / "export"):
            found = _folder_weights(folder)
            if found is not None:
                return found
        raise ValueError(
            f"model.pretrained={spec}: a folder without weights (no {FOLDER_WEIGHTS[0]} or "
            f"{FOLDER_WEIGHTS[2]}, no export/, no checkpoint model.safetensors)"
        )
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = dict(get_pretrained_cfg(arch, spec))
    if not tag_cfg:
        if p.suffix or os.sep in spec:
            raise ValueError(f"model.pretrained file not found: {spec}")
        tags = list_pretrained_tags_by_model(arch)
        known = f"its tags: {', '.join(tags)}" if tags else "it has no open_clip tags"
        raise ValueError(
            f"model.pretrained={spec}: not a file or folder, and not an open_clip tag of "
            f"model.name={arch} ({known})"
        )
    looked = _tag_candidates(tag_cfg)
    for c in looked:
        if c.is_file():
            return Pretrained(c, tag_cfg=tag_cfg)
    raise ValueError(
        f"model.pretrained={spec}: the weights of open_clip's {arch} '{spec}' are not on this "
        f"machine (looked in {', '.join(str(c) for c in looked) or 'no known place'}); clipkit "
        "does not download: put the file there or give its path"
    )


def read_state(pre: Pretrained) -> dict[str, torch.Tensor]:
    """The weights file's open_clip state dict (prefixes stripped).

    Raises:
        ValueError: the file cannot be read as weights (one line naming it).
    """
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(str(pre.path))
    except Exception as err:  # torch / safetensors raise many types on a bad file
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"model.pretrained: cannot read {pre.path}: {msg}") from None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"model.pretrained: {pre.path} holds no state dict")
    if pre.prefix:
        state = {
            k.removeprefix(pre.prefix): v for k, v in state.items() if k.startswith(pre.prefix)
        }
    return state


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOW_KEYS} more)" if len(keys) > SHOW_KEYS else ""
    return ", ".join(keys[:SHOW_KEYS]) + more


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, in one line, a state dict whose keys or shapes are not ``model``'s.

    Raises:
        ValueError: naming the first few missing / unexpected / mis-shaped keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_names(unexpected)}")
    if shapes:
        parts.append(f"other shapes {_names(shapes)}")
    if parts:
        raise ValueError(f"{source} does not fit the architecture: {'; '.join(parts)}")


def load_pretrained(clip: nn.Module, pre: Pretrained, arch: str) -> None:
    """Load ``pre``'s weights into the open_clip model ``clip`` (strict, dtype kept).

    Raises:
        ValueError: unreadable file, or keys / shapes that do not fit (one line).
    """
    state = read_state(pre)
    if "logit_scale" in state and state["logit_scale"].ndim != clip.logit_scale.ndim:
        # OpenAI's files keep a 0-d scale (open_clip's load_checkpoint reshapes it the same way)
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    check_state_fits(clip, state, f"model.pretrained={pre.path} (model.name={arch})")
    clip.load_state_dict(state, strict=True)


__all__ = [
    "Pretrained",
    "check_state_fits",
    "load_pretrained",
    "read_state",
    "resolve_pretrained",
]
