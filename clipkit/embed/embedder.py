"""Embedder: batched text and image embeddings from a clipkit / open_clip model, in input order.

Two backends behind one API: a PyTorch :class:`~clipkit.models.DualEncoder` (any device,
autocast), or an ONNX export (``clipkit export --format onnx``) run by onnxruntime on the CPU
through :class:`~clipkit.embed.onnx_model.OnnxModel`, whose tokenizer, image preprocessing and
forward use no torch (images are still decoded by :func:`load_image`).

Example:
    >>> emb = Embedder.load("runs/coco/export")          # or a run dir, or "open_clip:ViT-B-32"
    >>> t = emb.encode_text(["a dog", "a cat"])          # (2, D) float32 numpy, L2-normalised
    >>> v = emb.encode_image(["a.jpg", pil_img, jpeg_bytes, np_uint8_hwc])  # (4, D)
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipkit.data.decode import DecodeError, open_pil, to_rgb
from clipkit.embed.onnx_model import OnnxModel, default_threads, is_onnx_export
from clipkit.models import DualEncoder

ImageInput = Any  # str | Path | PIL.Image.Image | bytes | np.ndarray
# PIL's own decompression-bomb threshold; callers (the service) may lower it.
DEFAULT_MAX_PIXELS = 89_478_485
# Show a progress bar when an input spans more batches than this (unless told otherwise).
PROGRESS_MIN_BATCHES = 8


def model_fingerprint(model: DualEncoder) -> str:
    """A short id of the exact weights and config: sha256 over config JSON + every tensor."""
    h = hashlib.sha256(json.dumps(model.model_cfg, sort_keys=True).encode())
    for name, t in sorted(model.clip.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_image(item: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> Any:
    """Open one image given as a path, PIL image, encoded bytes or uint8 array, as RGB.

    Encoded images (paths, bytes) are decoded like the training data
    (:func:`clipkit.data.decode.open_pil`): EXIF orientation applied, any mode to RGB.

    Raises:
        ValueError: not decodable, too many pixels, or an unsupported type; names ``what``.
    """
    if isinstance(item, Image.Image | np.ndarray):
        if isinstance(item, Image.Image):
            img = item  # as the caller has it: no EXIF rotation on decoded images
        elif item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise ValueError(f"{what}: array must be (H, W) or (H, W, 1|3|4), got {item.shape}")
        else:
            arr = item if item.dtype == np.uint8 else np.clip(item * 255.0, 0, 255).astype(np.uint8)
            img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        _check_pixels(img.size, max_pixels, what)
        try:
            return to_rgb(img)  # a lazily opened PIL image decodes here
        except Exception as err:
            raise ValueError(f"{what}: cannot decode image ({type(err).__name__}: {err})") from None
    if not isinstance(item, bytes | bytearray | memoryview | str | Path):
        raise ValueError(f"{what}: unsupported type {type(item).__name__}")
    if isinstance(item, str | Path):
        if not Path(item).is_file():
            raise ValueError(f"{what}: file not found: {item}")
        try:
            data = Path(item).read_bytes()
        except OSError as err:
            raise ValueError(f"{what}: cannot read {item} ({err.strerror})") from None
    else:
        data = bytes(item)
    try:
        head = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as err:  # PIL raises several types for bad data
        raise ValueError(f"{what}: not a readable image ({type(err).__name__})") from None
    # Checked on the header, before decoding: the limit guards against decompression bombs.
    _check_pixels(head.size, max_pixels, what)
    try:
        return open_pil(data)
    except DecodeError as err:
        raise ValueError(f"{what}: cannot decode image ({err})") from None


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ValueError(f"{what}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class Embedder:
    """Batched, order-preserving embeddings from a :class:`DualEncoder` or an ONNX export.

    fp32 on CPU; on CUDA, fp16 autocast by default (``precision="bf16"`` or ``"fp32"`` to change).
    An :class:`~clipkit.embed.onnx_model.OnnxModel` runs fp32 on the CPU (onnxruntime).

    Attributes:
        model: the dual encoder (eval mode) or the ONNX model.
        model_id: fingerprint of the weights (:func:`model_fingerprint`), recorded by indexes.
        dim: embedding dimension D.
    """

    def __init__(
        self,
        model: DualEncoder | OnnxModel,
        device: str | None = None,
        precision: str | None = None,
        name: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.onnx = isinstance(model, OnnxModel)
        if self.onnx:
            if device not in (None, "cpu") or precision not in (None, "fp32"):
                raise ValueError(
                    f"an ONNX export runs fp32 on the CPU (onnxruntime), not device={device} "
                    f"precision={precision}"
                )
            self.device = torch.device("cpu")
            self.precision, self._amp_dtype = "fp32", None
            self.model = model
            self.name = name or model.name
            self.model_id = model.model_id
            self.dim = model.embed_dim
            self.max_pixels = max_pixels
            return
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision is None:
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
        if precision not in dtypes:
            raise ValueError(f"precision must be one of {', '.join(dtypes)}, got '{precision}'")
        self.precision = precision
        self._amp_dtype = dtypes[precision]
        self.model = model.to(self.device).eval()
        self.name = name or model.name
        self.model_id = model_fingerprint(model)
        self.dim = model.embed_dim
        self.max_pixels = max_pixels

    @classmethod
    def load(
        cls,
        source: str | Path,
        weights: str | None = None,
        device: str | None = None,
        precision: str | None = None,
    ) -> Embedder:
        """Load from an export dir, a training run dir (its ``export/``), a checkpoint folder,
        an HF ``CLIPModel`` folder, ``open_clip:ARCH`` (see
        :func:`clipkit.models.load.load_model`) or an ONNX export (onnxruntime backend).

        Args:
            source: export folder (``open_clip_config.json`` + weights), run folder holding
                ``export/``, checkpoint folder, HF ``CLIPModel`` folder, ONNX export folder
                (``preprocess.json`` + ``image.onnx`` + ``text.onnx``), or ``open_clip:ARCH``.
            weights: local weights file for ``open_clip:ARCH`` (random init when omitted).
            device: ``cpu``/``cuda``; default cuda when available.
            precision: ``fp32``/``fp16``/``bf16``; default fp16 on cuda, fp32 on cpu.

        Raises:
            ValueError: the source is none of those, or a weights file is missing.
        """
        from clipkit.models.load import load_model

        if is_onnx_export(source):
            if weights:
                raise ValueError(f"a weights file applies only to open_clip:ARCH, not to {source}")
            return cls(OnnxModel(source, threads=default_threads()), device, precision)
        model, name = load_model(str(source), weights or "", seed=None)
        return cls(model, device, precision, name=name)

    # ------------------------------------------------------------------ forward
    def _forward(self, fn: Callable[[Any], Any], x: Any) -> torch.Tensor:
        if self.onnx:  # numpy in, numpy out; torch only wraps the result (no copy)
            return torch.from_numpy(fn(x))
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self._amp_dtype is not None and self.device.type != "cpu":
                with torch.autocast(self.device.type, dtype=self._amp_dtype):
                    return fn(x).float()
            return fn(x)

    def _run(
        self,
        n: int,
        batch_size: int,
        prepare: Callable[[int, int], Any],
        fn: Callable[[Any], Any],
        progress: bool | None,
        desc: str,
    ) -> torch.Tensor:
        """Prepare batch i+1 in a thread while batch i runs; results stay in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        spans = _batches(n, batch_size)
        show = len(spans) > PROGRESS_MIN_BATCHES if progress is None else progress
        from tqdm import tqdm

        out: list[torch.Tensor] = []
        with (
            ThreadPoolExecutor(1) as pool,
            tqdm(total=n, desc=desc, unit="item", disable=not show) as bar,
        ):
            nxt = pool.submit(prepare, *spans[0]) if spans else None
            for i in range(len(spans)):
                x = nxt.result()  # (b, ...)
                nxt = pool.submit(prepare, *spans[i + 1]) if i + 1 < len(spans) else None
                out.append(self._forward(fn, x).cpu())  # (b, D)
                bar.update(len(x))
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @staticmethod
    def _finish(emb: torch.Tensor, single: bool, output: str) -> Any:
        if output not in ("numpy", "torch"):
            raise ValueError(f"output must be 'numpy' or 'torch', got '{output}'")
        emb = emb[0] if single else emb
        return emb.numpy() if output == "numpy" else emb

    def encode_text(
        self,
        texts: str | Sequence[str],
        batch_size: int = 256,
        normalize: bool = True,
        output: str = "numpy",
        progress: bool | None = None,
    ) -> Any:
        """Embed captions/sentences.

        Args:
            texts: one string or a sequence of N strings.
            batch_size: strings per forward pass.
            normalize: L2-normalise (the model's training geometry).
            output: ``numpy`` (float32) or ``torch``.
            progress: progress bar; default on when the input spans more than 8 batches.

        Returns:
            (N, D) embeddings in input order, or (D,) for a single string.

        Raises:
            ValueError: an item is not a string.
        """
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise ValueError(f"text {i}: expected a string, got {type(t).__name__}")

        def prepare(s: int, e: int) -> Any:
            return self.model.tokenize(items[s:e])  # (b, L)

        def fn(tok: Any) -> Any:
            return self.model.encode_text(tok, normalize=normalize)

        emb = self._run(len(items), batch_size, prepare, fn, progress, "embed text")
        return self._finish(emb, single, output)

    def preprocess(self, images: Sequence[ImageInput], offset: int = 0) -> torch.Tensor:
        """Decode and transform images into the model's input batch ``(B, 3, H, W)``.

        An ONNX model preprocesses with PIL + numpy (:meth:`OnnxModel.preprocess`, equal to the
        torch transform); the array is handed over as a tensor without a copy.
        """
        if self.onnx:
            arrays = [
                self.model.preprocess(load_image(im, self.max_pixels, f"image {offset + i}"))
                for i, im in enumerate(images)
            ]
            return torch.from_numpy(np.stack(arrays))  # (B, 3, H, W) float32
        pp = self.model.preprocess_eval
        return torch.stack(
            [
                pp(load_image(im, self.max_pixels, f"image {offset + i}"))
                for i, im in enumerate(images)
            ]
        )

    def encode_image(
        self,
        images: Any,
        batch_size: int = 64,
        normalize: bool = True,
        output: str = "numpy",
        progress: bool | None = None,
    ) -> Any:
        """Embed images.

        Args:
            images: one image or a sequence of N images; each a path, PIL image, encoded bytes
                or uint8 array (H, W[, C]). A float tensor (N, 3, H, W) is taken as already
                preprocessed.
            batch_size: images per forward pass.
            normalize: L2-normalise.
            output: ``numpy`` (float32) or ``torch``.
            progress: progress bar; default on when the input spans more than 8 batches.

        Returns:
            (N, D) embeddings in input order, or (D,) for a single image.

        Raises:
            ValueError: an image cannot be read (the message gives its position).
        """

        def fn(x: Any) -> Any:
            return self.model.encode_image(x, normalize=normalize)

        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"image tensor must be (N, 3, H, W), got {tuple(images.shape)}")
            x = images.detach().cpu().float().numpy() if self.onnx else images
            emb = self._run(len(x), batch_size, lambda s, e: x[s:e], fn, progress, "embed image")
            return self._finish(emb, False, output)
        single = isinstance(images, str | Path | bytes | bytearray | Image.Image) or (
            isinstance(images, np.ndarray) and images.ndim in (2, 3)
        )
        items = [images] if single else list(images)

        def prepare(s: int, e: int) -> Any:
            x = self.preprocess(items[s:e], offset=s)  # (b, 3, H, W)
            return x.numpy() if self.onnx else x

        emb = self._run(
            len(items),
            batch_size,
            prepare,
            fn,
            progress,
            "embed image",
        )
        return self._finish(emb, single, output)

    def info(self) -> dict[str, Any]:
        """Provenance recorded next to embeddings and in indexes."""
        import clipkit

        return {
            "name": self.name,
            "model_id": self.model_id,
            "dim": self.dim,
            "clipkit_version": getattr(clipkit, "__version__", "0"),
        }
