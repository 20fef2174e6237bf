"""WiSE-FT: weight-space ensembles of a zero-shot and a fine-tuned model.

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models", CVPR): with the same architecture,
``theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned`` for every floating
parameter and buffer keeps much of the fine-tuned accuracy while recovering the zero-shot model's
robustness; alpha 0 is the zero-shot model, 1 the fine-tuned one.

* Inputs are read by :func:`clipkit.models.load.load_model` (export, run or checkpoint folder);
  the zero-shot side may also be anything ``model.pretrained`` takes (a weights file, an open_clip
  folder or tag), loaded into the fine-tuned model's architecture.
* Interpolation is done in float64 and rounded once to each tensor's dtype; alpha 0 and 1 return
  the inputs' tensors themselves, bit for bit (the formula in floating point would turn a ``-0.0``
  into ``+0.0`` and ``inf`` into ``nan``). Integer and bool buffers must be equal, except
  BatchNorm's ``num_batches_tracked`` (a step counter that ``momentum=None`` alone reads, and that
  fine-tuning always changes): it is taken from the fine-tuned model.
* The result is written as the training run's export is (:meth:`DualEncoder.export`: open_clip's
  format), into a temporary sibling folder renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from clipkit.models.dual_encoder import DualEncoder

COUNTERS = ("num_batches_tracked",)  # integer buffers that count steps rather than hold weights


def check_alpha(alpha: float, flag: str = "--alpha") -> float:
    """``alpha`` as a float in [0, 1].

    Raises:
        ValueError: outside [0, 1] or not a number (one line naming ``flag``).
    """
    if not isinstance(alpha, (int, float)) or math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{flag} must be in [0, 1] (got {alpha})")
    return float(alpha)


def _arch(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model config without where an HF text tower's files were (each export names its own)."""
    cfg = copy.deepcopy(cfg)
    for k in ("hf_model_name", "hf_tokenizer_name", "hf_model_pretrained"):
        cfg.get("text_cfg", {}).pop(k, None)
    return cfg


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            here = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                return f"{here}: {a.get(k, '(absent)')} vs {b.get(k, '(absent)')}"
            diff = _first_difference(a[k], b[k], here)
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: {a} vs {b}"


def check_same_architecture(zeroshot: DualEncoder, finetuned: DualEncoder) -> None:
    """Refuse two models WiSE-FT cannot interpolate: other config, keys, shapes or dtypes.

    Raises:
        ValueError: one line naming the first differing config key or the first few keys.
    """
    from clipkit.models.pretrained import check_state_fits

    for name, m in (("--zeroshot", zeroshot), ("--finetuned", finetuned)):
        if not isinstance(m, DualEncoder):
            raise ValueError(f"{name} is a {type(m).__name__}, not an image-text model")
    diff = _first_difference(_arch(zeroshot.model_cfg), _arch(finetuned.model_cfg))
    if diff:
        raise ValueError(f"--zeroshot and --finetuned are different architectures ({diff})")
    zs = zeroshot.clip.state_dict()
    check_state_fits(finetuned.clip, zs, "--zeroshot's weights")
    fs = finetuned.clip.state_dict()
    dtypes = [f"{k} {zs[k].dtype} vs {fs[k].dtype}" for k in fs if zs[k].dtype != fs[k].dtype]
    if dtypes:
        raise ValueError(f"--zeroshot and --finetuned hold other dtypes: {', '.join(dtypes[:3])}")


def interpolate_state(
    zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * zeroshot + alpha * finetuned`` for every floating tensor.

    Args:
        zeroshot: state dict of the zero-shot model.
        finetuned: state dict with the same keys, shapes and dtypes.
        alpha: weight of the fine-tuned model, in [0, 1].

    Returns:
        A new state dict (same keys and dtypes). Floating tensors: the float64 combination
        rounded once to the dtype; at alpha 0 / 1 exactly the zero-shot / fine-tuned tensors.
        Integer and bool tensors: the (equal) value; ``num_batches_tracked``: the fine-tuned's.

    Raises:
        ValueError: alpha outside [0, 1], other keys, or integer tensors that differ.

    Example:
        >>> z, f = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}
        >>> interpolate_state(z, f, 0.5)["w"]
        tensor([0.5000, 3.0000])
    """
    alpha = check_alpha(alpha)
    if zeroshot.keys() != finetuned.keys():
        only = sorted(set(zeroshot) ^ set(finetuned))
        raise ValueError(f"--zeroshot and --finetuned have other keys: {', '.join(only[:3])}")
    out: dict[str, torch.Tensor] = {}
    for k, z in zeroshot.items():
        f = finetuned[k]
        if z.shape != f.shape or z.dtype != f.dtype:
            raise ValueError(f"{k}: {tuple(z.shape)} {z.dtype} vs {tuple(f.shape)} {f.dtype}")
        if not (z.is_floating_point() or z.is_complex()):
            if k.rsplit(".", 1)[-1] in COUNTERS:
                out[k] = f.clone()
            elif not torch.equal(z, f):
                raise ValueError(
                    f"integer buffer {k} differs between --zeroshot and --finetuned "
                    "(it cannot be interpolated)"
                )
            else:
                out[k] = z.clone()
        elif alpha == 0.0:
            out[k] = z.clone()
        elif alpha == 1.0:
            out[k] = f.clone()
        else:
            wide = torch.complex128 if z.is_complex() else torch.float64
            mix = (1.0 - alpha) * z.to(wide) + alpha * f.to(wide)
            out[k] = mix.to(z.dtype)
    return out


def wise_ft(zeroshot: DualEncoder, finetuned: DualEncoder, alpha: float) -> DualEncoder:
    """The WiSE-FT model at ``alpha``: the fine-tuned model's architecture, config and
    preprocessing with interpolated weights (the inputs are not changed).

    Raises:
        ValueError: see :func:`check_same_architecture` and :func:`interpolate_state`.
    """
    check_alpha(alpha)
    check_same_architecture(zeroshot, finetuned)
    state = interpolate_state(zeroshot.clip.state_dict(), finetuned.clip.state_dict(), alpha)
    model = copy.deepcopy(finetuned)
    model.clip.load_state_dict(state, strict=True)
    return model


def load_pair(zeroshot: str, finetuned: str) -> tuple[DualEncoder, DualEncoder]:
    """The two models of a WiSE-FT call, on the CPU.

    Args:
        zeroshot: an export, run or checkpoint folder, or what ``model.pretrained`` takes (a
            weights file, an open_clip folder, or a tag of the fine-tuned run's ``model.name``),
            loaded into the fine-tuned model's architecture.
        finetuned: an export, run or checkpoint folder.

    Raises:
        ValueError: one line naming the input that cannot be loaded.
    """
    from clipkit.models.load import load_model
    from clipkit.models.pretrained import load_pretrained, resolve_pretrained

    for flag, spec in (("--zeroshot", zeroshot), ("--finetuned", finetuned)):
        if spec.startswith("open_clip:"):  # load_model would give random weights
            raise ValueError(f"{flag} {spec} names no weights; give a folder or weights file")
    try:
        ft, _ = load_model(finetuned, seed=None)
    except ValueError as err:
        raise ValueError(f"--finetuned: {err}") from None
    if not isinstance(ft, DualEncoder):
        raise ValueError(f"--finetuned {finetuned} is not an image-text model")
    try:
        zs, _ = load_model(zeroshot, seed=None)
        return zs, ft
    except ValueError:
        pass  # not a model folder: weights for the fine-tuned architecture
    zs = copy.deepcopy(ft)
    try:
        pre = resolve_pretrained(zeroshot, _run_model_name(finetuned))
        load_pretrained(zs.clip, pre, "the --finetuned architecture")
    except ValueError as err:
        msg = str(err).replace("model.pretrained", "--zeroshot")
        raise ValueError(msg) from None
    return zs, ft


def _run_model_name(spec: str) -> str:
    """``model.name`` of a training run or checkpoint folder (open_clip tags are looked up for
    it); empty when ``spec`` carries no config."""
    from clipkit.config.loader import load_config

    p = Path(spec).expanduser()
    for cfg in (p / "config.yaml", p.parent / "config.yaml"):
        if cfg.is_file():
            try:
                return load_config(cfg).model.name
            except Exception:  # a foreign config.yaml: no name to offer, tags will not resolve
                return ""
    return ""


# --------------------------------------------------------------------------- output folders
def check_new_folder(path: str | Path, flag: str = "--output") -> Path:
    """``path`` as a folder that can be created whole: absent or empty, its parent writable.

    Raises:
        ValueError: one line naming ``flag`` and the path.
    """
    p = Path(path).expanduser().resolve()
    if p.exists() and not (p.is_dir() and not any(p.iterdir())):
        raise ValueError(f"{flag} {p} already exists and is not an empty folder; give a new one")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} parent folder does not exist: {p.parent}")
    try:
        tempfile.TemporaryDirectory(prefix=f".{p.name}.check", dir=p.parent).cleanup()
    except OSError as err:
        raise ValueError(f"{flag} folder is not writable: {p.parent} ({err.strerror})") from None
    return p


@contextmanager
def new_folder(path: Path, flag: str = "--output") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to fill; renamed to ``path`` on success, removed
    on any failure (so ``path`` is either whole or absent).

    Raises:
        ValueError: the writes failed with an ``OSError`` (one line).
    """
    path = check_new_folder(path, flag)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        yield tmp
        if path.is_dir():  # an empty folder given as the output
            path.rmdir()
        os.replace(tmp, path)
    except OSError as err:
        raise ValueError(f"cannot write {flag} {path}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_wise_ft(model: DualEncoder, output: str | Path) -> Path:
    """Export ``model`` in open_clip's format to ``output`` (whole or not at all).

    Raises:
        ValueError: ``output`` exists and is not empty, or cannot be written (one line).
    """
    path = check_new_folder(output)
    with new_folder(path) as tmp:
        model.export(tmp)
        _point_hf_paths(tmp, path)
    return path


def _point_hf_paths(written: Path, final: Path) -> None:
    """An HF text tower's export names its own folder for the HF config and tokenizer
    (:meth:`DualEncoder.export`); written under a temporary name, it must name the final one."""
    import json

    from clipkit.models.dual_encoder import EXPORT_CONFIG

    cfg_file = written / EXPORT_CONFIG
    payload = json.loads(cfg_file.read_text())
    text = payload["model_cfg"].get("text_cfg", {})
    here = str(written.resolve())
    changed = False
    for k in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(k) == here:
            text[k] = str(final)
            changed = True
    if changed:
        cfg_file.write_text(json.dumps(payload, indent=2))


__all__ = [
    "check_alpha",
    "check_new_folder",
    "check_same_architecture",
    "interpolate_state",
    "load_pair",
    "new_folder",
    "wise_ft",
    "write_wise_ft",
]
