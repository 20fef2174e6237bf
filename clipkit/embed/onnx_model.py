"""An ONNX export (``clipkit export --format onnx``) run with onnxruntime, without torch.

The folder holds ``image.onnx`` and ``text.onnx`` (each tower, unnormalised features, dynamic
batch), ``tokenizer.json`` (CLIP's BPE) and ``preprocess.json``, which says how to turn an image
and a caption into the graphs' inputs. This module does that with PIL, numpy, ``tokenizers``
and ``ftfy`` only, as open_clip does with torch:

* images: resize (shortest side to the size, then a centre crop; or ``squash`` to the size) with
  PIL's filter, ``/ 255`` and ``(x - mean) / std`` in float32: the operations torchvision's
  ``Resize`` (on a PIL image), ``CenterCrop`` (offsets ``round((h - size) / 2)``), ``ToTensor``
  and ``Normalize`` perform, so the arrays equal the torch preprocessing bit for bit;
* captions: open_clip's cleaning (``ftfy.fix_text``, HTML entities decoded twice, whitespace
  collapsed, lower case), CLIP's BPE from ``tokenizer.json``, then start + ids + end, cut to the
  context length (the end token kept last) and padded with 0, as open_clip's ``SimpleTokenizer``;
* a text graph with a dynamic length (``"dynamic_length": true``) gets each batch cut after its
  longest caption, as ``DualEncoder.encode_text`` does (exact for the causal tower).

Example:
    >>> m = OnnxModel("exports/onnx")
    >>> m.encode_text(m.tokenize(["a dog"]))   # (1, D) float32, L2-normalised
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ONNX_CONFIG = "preprocess.json"
FORMAT = "clipkit-onnx"
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def is_onnx_export(folder: str | Path) -> bool:
    """Whether ``folder`` holds a clipkit ONNX export (``preprocess.json`` of that format)."""
    path = Path(folder).expanduser() / ONNX_CONFIG
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _clean(text: str) -> str:
    """open_clip's caption cleaning (``basic_clean``, ``whitespace_clean``, lower case)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def _l2(x: np.ndarray) -> np.ndarray:
    """Rows divided by their norm (clamped at 1e-12, as ``torch.nn.functional.normalize``)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class OnnxModel:
    """Both towers of an ONNX export, with their tokenizer and image preprocessing.

    Args:
        folder: the export folder (``preprocess.json``, ``image.onnx``, ``text.onnx``,
            ``tokenizer.json``).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).

    Attributes:
        name: the folder.
        model_id: the exported model's fingerprint (the PyTorch model's, so indexes built from
            either serve with the other).
        embed_dim: D.

    Raises:
        ValueError: not an ONNX export, or a file of it is missing or unreadable.
    """

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        p = Path(folder).expanduser()
        if not is_onnx_export(p):
            raise ValueError(f"{p}: not an ONNX export ({ONNX_CONFIG} of format {FORMAT})")
        cfg = json.loads((p / ONNX_CONFIG).read_text())
        self.config = cfg
        self.name = str(p)
        self.embed_dim = int(cfg["embed_dim"])
        self.model_id = str(cfg.get("model_id") or self._files_digest(p, cfg))
        img, txt = cfg["image"], cfg["text"]
        for f in (img["file"], txt["file"], txt["tokenizer_file"]):
            if not (p / f).is_file():
                raise ValueError(f"{p}: ONNX export without {f}")
        if img["resize_mode"] not in ("shortest", "squash") or img["interpolation"] not in _FILTERS:
            raise ValueError(
                f"{p / ONNX_CONFIG}: resize_mode {img['resize_mode']!r} / interpolation "
                f"{img['interpolation']!r} (this reader takes shortest|squash, bicubic|bilinear)"
            )
        self.size = (int(img["size"][0]), int(img["size"][1]))  # (H, W)
        self.mean = np.asarray(img["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(img["std"], dtype=np.float32).reshape(3, 1, 1)
        self.context_length = int(txt["context_length"])
        self.sot, self.eot, self.pad = int(txt["sot_id"]), int(txt["eot_id"]), int(txt["pad_id"])
        self.dynamic_length = bool(txt.get("dynamic_length", False))
        self.tokenizer = Tokenizer.from_file(str(p / txt["tokenizer_file"]))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self._image = ort.InferenceSession(str(p / img["file"]), opts, providers=providers)
        self._text = ort.InferenceSession(str(p / txt["file"]), opts, providers=providers)
        self._io = {"image": (img["input"], img["output"]), "text": (txt["input"], txt["output"])}

    @staticmethod
    def _files_digest(p: Path, cfg: dict[str, Any]) -> str:
        h = hashlib.sha256()
        for f in (cfg["image"]["file"], cfg["text"]["file"]):
            with open(p / f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ inputs
    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Captions -> ``(B, L)`` int64 token ids, as open_clip's ``SimpleTokenizer``."""
        L = self.context_length
        out = np.full((len(texts), L), self.pad, dtype=np.int64)  # (B, L)
        encs = self.tokenizer.encode_batch([_clean(t) for t in texts], add_special_tokens=False)
        for i, enc in enumerate(encs):
            ids = [self.sot, *enc.ids, self.eot]
            if len(ids) > L:
                ids = ids[:L]
                ids[-1] = self.eot
            out[i, : len(ids)] = ids
        return out

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> ``(3, H, W)`` float32, as the PyTorch model's eval transform."""
        h, w = self.size
        filt = _FILTERS[self.config["image"]["interpolation"]]
        if self.config["image"]["resize_mode"] == "squash":
            image = image.resize((w, h), filt)
        else:
            iw, ih = image.size
            short, long = (iw, ih) if iw <= ih else (ih, iw)
            new_long = int(h * long / short)  # torchvision's rule: the long side truncated
            nw, nh = (h, new_long) if iw <= ih else (new_long, h)
            if (nw, nh) != (iw, ih):
                image = image.resize((nw, nh), filt)
            image = self._center_crop(image, h, w)
        x = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
        return (x.transpose(2, 0, 1) - self.mean) / self.std  # (3, H, W)

    @staticmethod
    def _center_crop(image: Image.Image, h: int, w: int) -> Image.Image:
        """torchvision's ``CenterCrop`` on a PIL image: zero padding first if it is smaller."""
        iw, ih = image.size
        if iw < w or ih < h:
            pl, pt = (w - iw) // 2 if iw < w else 0, (h - ih) // 2 if ih < h else 0
            canvas = Image.new(image.mode, (max(iw, w), max(ih, h)))
            canvas.paste(image, (pl, pt))
            image, (iw, ih) = canvas, canvas.size
        top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
        return image.crop((left, top, left + w, top + h))

    # ------------------------------------------------------------------ towers
    def _run(self, tower: str, x: np.ndarray, normalize: bool) -> np.ndarray:
        name_in, name_out = self._io[tower]
        session = self._image if tower == "image" else self._text
        y = session.run([name_out], {name_in: x})[0].astype(np.float32, copy=False)  # (B, D)
        return _l2(y) if normalize else y

    def encode_image(self, x: np.ndarray, normalize: bool = True) -> np.ndarray:
        """``(B, 3, H, W)`` float32 -> ``(B, D)`` float32 embeddings."""
        return self._run("image", np.ascontiguousarray(x, dtype=np.float32), normalize)

    def encode_text(self, ids: np.ndarray, normalize: bool = True) -> np.ndarray:
        """``(B, L)`` token ids -> ``(B, D)`` float32 embeddings."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.dynamic_length and ids.size:
            pos = np.arange(1, ids.shape[1] + 1)  # (L,)
            n = int(((ids != self.pad) * pos).max())  # the longest caption's last token + 1
            ids = ids[:, : max(2, n)]  # (B, L'): the graph takes 2 .. L
        return self._run("text", np.ascontiguousarray(ids), normalize)


def default_threads() -> int | None:
    """``OMP_NUM_THREADS`` as onnxruntime's thread count when set (as torch honours it)."""
    v = os.environ.get("OMP_NUM_THREADS", "")
    return int(v) if v.isdigit() and int(v) > 0 else None
