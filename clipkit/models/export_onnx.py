"""A dual encoder as two ONNX graphs plus what it takes to feed them without torch.

``image.onnx``: ``pixel_values (B, 3, H, W) float32 -> image_embeds (B, D)``; ``text.onnx``:
``input_ids (B, L) int64 -> text_embeds (B, D)``; both unnormalised (the reader normalises, as
``DualEncoder.encode_*(normalize=...)`` does), batch dynamic. For open_clip's causal text
transformer pooled at the end token, L is dynamic too (2 .. context length): the reader cuts each
batch after its longest caption, as ``DualEncoder.encode_text`` does in PyTorch (exact: no kept
position attends to a cut one, positions are absolute, the pooled token is kept); other towers
take the full context length (``"dynamic_length": false``). ``preprocess.json`` records the image
size, mean/std, resize mode and filter, the tokenizer kind, its file and special ids, and the
PyTorch model's fingerprint; :class:`clipkit.embed.onnx_model.OnnxModel` reads the folder.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the default and the
maintained path in torch 2.14. Both exporters give correct graphs of open_clip's own tower
forwards (``clip.encode_image`` / ``clip.encode_text`` at full length), which are exported rather
than ``DualEncoder.encode_text``: that cuts each batch to its longest caption, a data-dependent
shape the TorchScript exporter freezes at the example's length (wrong for longer captions).
The dynamic-length text graph (:class:`_TextCut`) takes the cut ids from the reader instead.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipkit.embed.onnx_model import FORMAT, ONNX_CONFIG
from clipkit.models.export_tokenizer import VOCAB_SIZE, uses_clip_bpe, write_clip_tokenizer

OPSET = 18
MAX_SINGLE_FILE = 1_800_000_000  # protobuf's 2 GiB limit, with room: larger weights go beside


class _Tower(nn.Module):
    """One tower of an open_clip model as a module with a single named input."""

    def __init__(self, clip: nn.Module, image: bool) -> None:
        super().__init__()
        self.clip, self.image = clip, image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x) if self.image else self.clip.encode_text(x)  # (B, D)


class _TextCut(nn.Module):
    """open_clip ``CLIP.encode_text`` on ids ``(B, L')``, L' <= the context length: positions
    and the causal mask sliced to L' (the forward open_clip runs at full length)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        c, n = self.clip, text.shape[1]
        x = c.token_embedding(text) + c.positional_embedding[:n]  # (B, L', W)
        x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask[:n, :n]))  # causal (L', L')
        x = text_global_pool(x, text, "argmax")  # (B, W): the end token, the largest id
        return x @ c.text_projection  # (B, D)


def _cuttable(clip: nn.Module) -> bool:
    """Whether the text tower is open_clip's causal transformer pooled at argmax (cut exact)."""
    from open_clip.model import CLIP

    return (
        type(clip) is CLIP
        and getattr(clip, "text_pool_type", "") == "argmax"
        and clip.attn_mask is not None
        and isinstance(clip.text_projection, nn.Parameter)
    )


def onnx_refusal(model: Any) -> str:
    """Why ``model`` cannot be exported to ONNX with a torch-free reader, or ``""``."""
    if not hasattr(model, "clip") or not hasattr(model.clip, "encode_text"):
        return f"it is a {type(model).__name__}, not an image-text model"
    why = uses_clip_bpe(model)
    if why:
        return why + " (the ONNX reader tokenises with CLIP's BPE)"
    pp = model.clip.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else tuple(pp["size"])
    mode = pp.get("resize_mode", "shortest")
    if mode == "longest" or (
        mode == "shortest" and not isinstance(size, int) and size[0] != size[1]
    ):
        return f"its preprocessing (resize_mode {mode}, size {size}) has no torch-free reader here"
    if pp.get("interpolation", "bicubic") not in ("bicubic", "bilinear"):
        return f"its preprocessing interpolation {pp.get('interpolation')!r} is not supported"
    return ""


def _export(
    tower: nn.Module,
    example: torch.Tensor,
    path: Path,
    names: tuple[str, str],
    max_length: int = 0,
) -> None:
    """Export ``tower`` with a dynamic batch (and length up to ``max_length`` when given)."""
    n_bytes = sum(p.numel() * p.element_size() for p in tower.parameters())
    dims = {0: torch.export.Dim("batch", min=1)}
    if max_length:
        dims[1] = torch.export.Dim("length", min=2, max=max_length)
    torch.onnx.export(
        tower,
        (example,),
        str(path),
        input_names=[names[0]],
        output_names=[names[1]],
        dynamo=True,
        dynamic_shapes=(dims,),
        opset_version=OPSET,
        external_data=n_bytes > MAX_SINGLE_FILE,
        verbose=False,
    )


def write_onnx(model: Any, out: Path, model_id: str = "") -> None:
    """Write ``image.onnx``, ``text.onnx``, the tokenizer files and ``preprocess.json``.

    Args:
        model: a :class:`~clipkit.models.DualEncoder` (eval mode is set here).
        out: an existing, empty folder.
        model_id: the fingerprint to record (the PyTorch model's), so an index built with either
            serves with the other.

    Raises:
        ValueError: :func:`onnx_refusal`'s reason.
    """
    why = onnx_refusal(model)
    if why:
        raise ValueError(f"no ONNX export: {why}")
    clip = model.clip.eval()
    pp = dict(clip.visual.preprocess_cfg)
    size = [pp["size"]] * 2 if isinstance(pp["size"], int) else list(pp["size"])
    L = int(model.model_cfg["text_cfg"].get("context_length", 77))
    image_in = torch.zeros(2, 3, *size)  # (2, 3, H, W): batch 2 so it stays symbolic
    text_in = model.tokenize(["a photo", "a photo of a dog"])  # (2, L)
    dynamic = _cuttable(clip)
    text = _TextCut(clip) if dynamic else _Tower(clip, False)
    # The exporter prints progress lines on stdout; the CLI's output stays its own.
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        names = ("pixel_values", "image_embeds")
        _export(_Tower(clip, True).eval(), image_in, out / "image.onnx", names)
        names = ("input_ids", "text_embeds")
        _export(text.eval(), text_in, out / "text.onnx", names, L if dynamic else 0)
    write_clip_tokenizer(out, L)
    config = {
        "format": FORMAT,
        "version": 1,
        "embed_dim": model.embed_dim,
        "model_id": model_id,
        "image": {
            "file": "image.onnx",
            "input": "pixel_values",
            "output": "image_embeds",
            "size": size,  # [H, W]
            "resize_mode": pp.get("resize_mode", "shortest"),
            "interpolation": pp.get("interpolation", "bicubic"),
            "mean": list(pp["mean"]),
            "std": list(pp["std"]),
        },
        "text": {
            "file": "text.onnx",
            "input": "input_ids",
            "output": "text_embeds",
            "tokenizer": "clip_bpe",
            "tokenizer_file": "tokenizer.json",
            "context_length": L,
            "dynamic_length": dynamic,  # the reader may cut a batch after its longest caption
            "sot_id": VOCAB_SIZE - 2,
            "eot_id": VOCAB_SIZE - 1,
            "pad_id": 0,
            "clean": "ftfy.fix_text, html.unescape twice, whitespace collapsed, lower case",
        },
    }
    (out / ONNX_CONFIG).write_text(json.dumps(config, indent=2))
