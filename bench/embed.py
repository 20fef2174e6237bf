"""Embedder API overhead: ``Embedder.encode_image/encode_text`` vs a raw batched forward.

Run (timing runs never overlap on the shared machine):
    flock /tmp/clipkit-bench.lock python bench/embed.py --model open_clip:ViT-B-32

Images are the COCO-mini JPEGs (``$CLIPKIT_DATA`` or ../shared/data), given to both sides as
encoded bytes: the raw loop decodes, preprocesses, stacks and calls the tower; the API does the
same through its batching (which prepares the next batch in a thread). A second image case feeds
already-preprocessed tensors, isolating the API's own bookkeeping. Raw and API runs alternate,
``--repeats`` times (which side goes first alternates too); the ratio of medians is printed
(API / raw: < 1.05 means < 5% overhead).

``--onnx DIR`` (an ONNX export of ``--model``: ``clipkit export MODEL --format onnx --output DIR``)
adds onnxruntime vs PyTorch CPU throughput: the same ``Embedder`` API over each backend, same
inputs, same thread count, alternating; items/s, the ORT / PyTorch ratio and the max abs
difference of the embeddings:
    clipkit export /tmp/b32 --format onnx --output /tmp/b32-onnx
    flock /tmp/clipkit-bench.lock python bench/embed.py --model /tmp/b32 --onnx /tmp/b32-onnx
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clipkit.embed import Embedder  # noqa: E402


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="open_clip:ViT-B-32")
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, help="API precision (default fp32 cpu, fp16 cuda)")
    ap.add_argument("--cases", default="bytes,tensors,text", help="which rows to run")
    ap.add_argument("--onnx", default="", help="ONNX export of --model: onnxruntime vs PyTorch")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(os.environ.get("CLIPKIT_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    coco = root / "coco_mini"
    files = sorted((coco / "train2017").glob("*.jpg"))
    blobs = [files[i % len(files)].read_bytes() for i in range(a.images)]
    caps = [ln.split("\t", 1)[1] for ln in (coco / "captions.tsv").read_text().splitlines()[1:]]
    texts = [caps[i % len(caps)] for i in range(a.texts)]
    emb = Embedder.load(a.model, device=a.device, precision=a.precision)
    model, pp, bs = emb.model, emb.model.preprocess_eval, a.batch_size
    dev, amp = emb.device, emb._amp_dtype  # the raw loop uses the same device and autocast

    def fwd(fn, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dev)
        if amp is not None and dev.type != "cpu":
            with torch.autocast(dev.type, dtype=amp):
                return fn(x).float().cpu()
        return fn(x).cpu()

    print(
        f"model {a.model} (dim {emb.dim}), {a.images} images, {a.texts} texts, batch {bs}, "
        f"{a.threads} torch threads",
        flush=True,
    )

    def raw_images() -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for s in range(0, len(blobs), bs):
                x = torch.stack(
                    [pp(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[s : s + bs]]
                )
                out.append(fwd(model.encode_image, x))  # (b, D)
        return torch.cat(out)

    with torch.inference_mode():
        pre = torch.stack([pp(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])

    def raw_tensors() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat(
                [fwd(model.encode_image, pre[s : s + bs]) for s in range(0, len(pre), bs)]
            )

    def raw_texts() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat(
                [
                    fwd(model.encode_text, model.tokenize(texts[s : s + 256]))
                    for s in range(0, len(texts), 256)
                ]
            )

    cases = [
        ("bytes", "image (JPEG bytes)", raw_images, lambda: emb.encode_image(blobs, batch_size=bs)),
        ("tensors", "image (tensors)", raw_tensors, lambda: emb.encode_image(pre, batch_size=bs)),
        ("text", "text", raw_texts, lambda: emb.encode_text(texts, batch_size=256)),
    ]
    wanted = a.cases.split(",")
    cases = [c[1:] for c in cases if c[0] in wanted]
    print("| case | raw s (median) | API s (median) | API / raw | max abs diff |")
    print("|---|---|---|---|---|")
    for name, raw_fn, api_fn in cases:
        raw_t, api_t = [], []
        for i in range(a.repeats):
            # Alternate which side goes first: the second of two back-to-back runs was measured
            # ~5% slower whichever it was (allocator / clock state), which is not API overhead.
            for side in ("raw", "api") if i % 2 == 0 else ("api", "raw"):
                if side == "raw":
                    t, ref = timed(raw_fn)
                    raw_t.append(t)
                else:
                    t, got = timed(api_fn)
                    api_t.append(t)
        diff = float(np.abs(np.asarray(got) - ref.numpy()).max())
        r, p = float(np.median(raw_t)), float(np.median(api_t))
        print(f"| {name} | {r:.2f} | {p:.2f} | {p / r:.3f} | {diff:.1e} |", flush=True)
    if a.onnx:
        onnx_vs_torch(a, emb, blobs, pre, texts)


def onnx_vs_torch(a: argparse.Namespace, emb: Embedder, blobs, pre, texts) -> None:
    """onnxruntime vs PyTorch on the CPU through the one Embedder API (same threads)."""
    from clipkit.embed.onnx_model import OnnxModel

    if emb.device.type != "cpu":
        raise SystemExit("--onnx compares CPU throughput: use --device cpu")
    ort = Embedder(OnnxModel(a.onnx, threads=a.threads))
    if ort.model_id != emb.model_id:
        print(f"warning: {a.onnx} is not an export of {a.model} (model_id differs)")
    bs = a.batch_size
    cases = [
        ("image (JPEG bytes)", len(blobs), lambda e: e.encode_image(blobs, batch_size=bs)),
        ("image (tensors)", len(pre), lambda e: e.encode_image(pre, batch_size=bs)),
        ("text", len(texts), lambda e: e.encode_text(texts, batch_size=256)),
    ]
    print(f"\nonnxruntime vs PyTorch, CPU, {a.threads} threads each, fp32")
    print("| case | PyTorch items/s | onnxruntime items/s | ORT / PyTorch | max abs diff |")
    print("|---|---|---|---|---|")
    for name, n, fn in cases:
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        outs = {}
        for i in range(a.repeats):
            for side in ("torch", "ort") if i % 2 == 0 else ("ort", "torch"):
                who = emb if side == "torch" else ort
                t, outs[side] = timed(lambda fn=fn, who=who: fn(who))
                times[side].append(t)
        pt, ot = n / float(np.median(times["torch"])), n / float(np.median(times["ort"]))
        diff = float(np.abs(outs["ort"] - outs["torch"]).max())
        print(f"| {name} | {pt:.1f} | {ot:.1f} | {ot / pt:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
