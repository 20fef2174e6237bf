"""Data loading throughput: clipkit's shard loader vs open_clip's WebDataset pipeline.

    flock /tmp/clipkit-bench.lock python bench/data.py [--reps 3] [--batches 60]

Builds (once, cached in --corpus, never in the repo) 8 shards x 1,000 web-size JPEGs
(320x240..1024x768, quality 86-94) cut from ../shared/data/coco_mini photos with their captions,
then measures samples/s (median of --reps) of each pipeline from iterator creation to the
--batches-th batch of 64 at 224 px (RandomResizedCrop scale (0.9, 1.0), bicubic, tokenised),
with 2 workers and with 0. Also prints the physical limits on this machine (raw tar read and
full-size JPEG decode per core) and the fraction of them clipkit reaches. Its last line reads
``speedup vs open_clip (2 workers): X.XXx``.

``--baseline REV`` adds rows for clipkit at git revision REV (a throw-away worktree, measured in
a subprocess per run, interleaved with the others) and the lines ``clipkit vs clipkit@REV (0
workers, one core): X.XXx samples/s per core`` and ``(W workers): X.XXx``. ``--profile`` first
prints where a sample's CPU time goes in one loading process on one core (tar read, JPEG
header, DCT-scaled decode, crop + resize, tokenisation, batch stacking; the rest of the loader
as ``other``), as process CPU time, so other jobs on the machine inflate it less than wall
time.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from functools import partial
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH, SIZE, SHARDS, PER_SHARD = 64, 224, 8, 1000


# -- corpus ------------------------------------------------------------------------------------
def _make_shard(index: int, photos: list[str], captions: dict[str, list[str]], out: str) -> int:
    import webdataset as wds
    from PIL import Image

    rng = random.Random(1000 + index)
    with wds.TarWriter(f"{out}/{index:05d}.tar") as tw:
        for j in range(PER_SHARD):
            path = photos[rng.randrange(len(photos))]
            img = Image.open(path).convert("RGB")
            w = rng.randint(320, 1024)
            h = round(w * 0.75)
            if rng.random() < 0.3:  # some portrait images
                w, h = h, w
            # Random crop of the photo with the target aspect, then resize (upscales some).
            aspect = w / h
            cw = min(img.width, int(img.height * aspect))
            ch = int(cw / aspect)
            x0, y0 = rng.randint(0, img.width - cw), rng.randint(0, img.height - ch)
            img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=rng.randint(86, 94))
            cap = rng.choice(captions[Path(path).name])
            tw.write({"__key__": f"{index:05d}{j:04d}", "jpg": buf.getvalue(), "txt": cap})
    return PER_SHARD


def build_corpus(out: Path, data_root: Path) -> Path:
    """8 x 1000 web-size JPEG shards + sizes.json in ``out`` (reused when complete)."""
    if (out / "sizes.json").is_file() and len(list(out.glob("*.tar"))) == SHARDS:
        return out
    out.mkdir(parents=True, exist_ok=True)
    coco = json.loads((data_root / "coco_mini/annotations/captions_train2017.json").read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    captions: dict[str, list[str]] = {}
    for a in coco["annotations"]:
        captions.setdefault(names[a["image_id"]], []).append(a["caption"].strip())
    photos = sorted(str(p) for p in (data_root / "coco_mini/train2017").glob("*.jpg"))
    print(f"building corpus in {out} ...", flush=True)
    with get_context("fork").Pool(2) as pool:
        pool.map(
            partial(_make_shard, photos=photos, captions=captions, out=str(out)), range(SHARDS)
        )
    sizes = {f"{i:05d}.tar": PER_SHARD for i in range(SHARDS)}
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


# -- pipelines ---------------------------------------------------------------------------------
def clipkit_iter(spec: str, workers: int, tokenizer, cpu_normalize: bool = False, decode="workers"):
    from clipkit.config.schema import DataConfig
    from clipkit.data import build_train_loader

    extra = {"decode": decode} if decode != "workers" else {}  # --baseline: older configs
    cfg = DataConfig(train=spec, workers=workers, **extra)
    import open_clip

    loader = build_train_loader(
        cfg,
        tokenizer=tokenizer,
        image_size=SIZE,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        batch_size=BATCH,
        seed=0,
    )
    for batch in loader:
        if cpu_normalize:
            batch["image"] = loader.normalize(batch["image"])
        if batch["image"].is_cuda:  # data.decode=device: count a batch once its pixels exist
            import torch

            torch.cuda.synchronize()
        yield batch["image"], batch["text"]


def _shim_open_clip() -> None:
    """open_clip_train.data on webdataset 1.x: its group_by_keys_nothrow does not expect the
    end-of-shard ``{}`` marker that tar_file_expander now yields (KeyError: 'fname'); the one-line
    fix is to ask for no marker. Everything else is open_clip's own code."""
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander

    ocd.tar_file_expander = partial(tar_file_expander, eof_value=None)


def open_clip_iter(spec: str, workers: int, tokenizer):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    pre = open_clip.image_transform(
        SIZE, is_train=True, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    args = Namespace(
        train_data=spec,
        val_data=None,
        dataset_resampled=False,
        train_num_samples=SHARDS * PER_SHARD,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=BATCH,
        workers=workers,
        world_size=1,
    )
    info = get_wds_dataset(args, pre, is_train=True, epoch=0, tokenizer=tokenizer)
    yield from info.dataloader


def baseline_rate(tree: Path, spec: str, workers: int, batches: int) -> float:
    """clipkit at another revision (checked out in ``tree``): one measurement in a subprocess."""
    code = (
        "import sys, open_clip, torch; sys.argv = ['x']; torch.set_num_threads(1)\n"
        # The tree's own bench/data.py: it puts its tree first on sys.path (this file would
        # put this checkout first, and the "baseline" would measure today's clipkit).
        f"sys.path.insert(0, {str(tree / 'bench')!r})\n"
        "import data as d\n"
        "tok = open_clip.get_tokenizer('ViT-B-32')\n"
        f"print(d.measure(lambda: d.clipkit_iter({spec!r}, {workers}, tok), {batches}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def profile(urls: list[str], tok, n: int = 640) -> None:
    """Per-stage CPU milliseconds of a sample on one core (process time), then the loader's."""
    import math
    import random

    import simplejpeg
    import torch
    import webdataset as wds
    from PIL import Image

    from clipkit.data import decode as dec

    t = {k: 0.0 for k in ("tar read", "JPEG header", "decode", "crop + resize")}
    clock = time.process_time
    t0, samples = clock(), []
    for _, smp in zip(range(n), wds.tarfile_samples([{"url": u} for u in urls[2:4]])):
        samples.append(smp)
    t["tar read"] = clock() - t0
    images, pil = [], 0.0
    for i, smp in enumerate(samples):
        data, rng = smp["jpg"], random.Random(i)
        t0 = clock()
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        box = dec.crop_params(rng, h, w, (0.9, 1.0))
        t1 = clock()
        arr = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=min(h, math.ceil(SIZE * h / box[2])),
            min_width=min(w, math.ceil(SIZE * w / box[3])),
        )
        t2 = clock()
        images.append(dec._resize_box_array(arr, box, (h, w), SIZE))
        t3 = clock()
        dec._resize_box(Image.fromarray(arr), box, (h, w), SIZE)  # before: PIL image, crop, resize
        pil += clock() - t3
        t["JPEG header"] += t1 - t0
        t["decode"] += t2 - t1
        t["crop + resize"] += t3 - t2
    caps = [smp["txt"].decode() for smp in samples]
    t0 = clock()
    for k in range(0, n, BATCH):
        tok(caps[k : k + BATCH])
    t["tokenise"] = clock() - t0
    t0 = clock()
    for k in range(0, n, BATCH):
        torch.stack(images[k : k + BATCH])
    t["stack batch"] = clock() - t0
    spec = str(Path(urls[0]).parent / f"{{00000..{SHARDS - 1:05d}}}.tar")
    it = iter(clipkit_iter(spec, 0, tok))
    for _ in range(20):  # past the shuffle buffer's fill
        next(it)
    t0, m = clock(), 0
    for _ in range(n // BATCH):
        m += next(it)[0].shape[0]
    total = (clock() - t0) / m * 1e3
    parts = {k: v / n * 1e3 for k, v in t.items()}
    parts["other (loader, decode loop, samples)"] = max(0.0, total - sum(parts.values()))
    print(
        f"\nper-sample CPU profile (1 core, process time, {n} samples, batch {BATCH}, {SIZE} px):"
    )
    print("| stage | ms / sample | share |\n|---|---|---|")
    for k, v in parts.items():
        print(f"| {k} | {v:.3f} | {v / total:.0%} |")
    print(f"| total (0-worker loader) | {total:.3f} | = {1e3 / total:.0f} samples/s per core |")
    print(
        f"(the previous crop + resize, PIL image + crop + bicubic: {pil / n * 1e3:.3f} ms / sample)"
    )


def measure(make_iter, batches: int) -> float:
    """Samples/s from iterator creation to the ``batches``-th batch."""
    t0 = time.perf_counter()
    n = 0
    for i, (images, _) in enumerate(make_iter()):
        n += images.shape[0]
        if i + 1 == batches:
            break
    return n / (time.perf_counter() - t0)


# -- physical limits ---------------------------------------------------------------------------
def raw_read_rate(urls: list[str]) -> float:
    import webdataset as wds

    t0, n = time.perf_counter(), 0
    for _ in wds.tarfile_samples([{"url": u} for u in urls]):
        n += 1
    return n / (time.perf_counter() - t0)


def decode_rates(url: str, n: int = 300) -> dict[str, float]:
    import numpy as np
    import simplejpeg
    import webdataset as wds
    from PIL import Image

    blobs = [s["jpg"] for _, s in zip(range(n), wds.tarfile_samples([{"url": url}]))]
    out = {}
    t0 = time.perf_counter()
    for b in blobs:
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
    out["PIL full decode"] = len(blobs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in blobs:
        simplejpeg.decode_jpeg(b, colorspace="RGB")
    out["libjpeg-turbo full decode"] = len(blobs) / (time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=Path("/tmp/clipkit-bench-data-corpus"))
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--workers", type=int, default=2, help="workers of the multi-worker runs")
    p.add_argument("--baseline", default=None, help="also time clipkit at this git revision")
    p.add_argument("--profile", action="store_true", help="per-stage CPU profile first")
    p.add_argument(
        "--device-decode", action="store_true", help="add clipkit with data.decode=device (CUDA)"
    )
    args = p.parse_args()
    corpus = build_corpus(args.corpus, args.data_root)
    lock = open("/tmp/clipkit-bench.lock", "a")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("note: /tmp/clipkit-bench.lock is held (by flock(1) around this run, I assume)")

    import open_clip
    import torch

    torch.set_num_threads(1)  # the loading process itself; workers set their own
    tok = open_clip.get_tokenizer("ViT-B-32")
    spec = str(corpus / f"{{00000..{SHARDS - 1:05d}}}.tar")
    urls = [str(corpus / f"{i:05d}.tar") for i in range(SHARDS)]
    sizes = [os.path.getsize(u) for u in urls]
    print(
        f"corpus: {SHARDS} shards x {PER_SHARD} JPEGs, {sum(sizes) / 8000 / 1e3:.0f} KB/image; "
        f"batch {BATCH}, {SIZE} px, {args.batches} batches per run, median of {args.reps}; "
        f"{os.cpu_count()} cores"
    )
    for _ in wds_warm(urls):
        pass
    try:
        next(iter(open_clip_iter(spec, 0, tok)))
        print("open_clip_train.data runs unmodified on this webdataset")
    except KeyError as err:
        print(
            f"open_clip_train.data unmodified on webdataset 1.x: KeyError {err}; "
            "using it with the one-line eof_value shim"
        )
    _shim_open_clip()
    if args.profile:
        profile(urls, tok)
    W = args.workers
    base_tree = None
    if args.baseline:
        base_tree = Path(tempfile.mkdtemp(prefix="clipkit-baseline-")) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base_tree),
             args.baseline],
            check=True,
        )  # fmt: skip
        rev = subprocess.run(
            ["git", "-C", str(base_tree), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        print(f"baseline: clipkit at {args.baseline} ({rev}) in {base_tree}")
    runs = {
        ("open_clip", W): lambda: open_clip_iter(spec, W, tok),
        ("clipkit", W): lambda: clipkit_iter(spec, W, tok),
        ("clipkit + CPU normalize", W): lambda: clipkit_iter(spec, W, tok, cpu_normalize=True),
        ("open_clip", 0): lambda: open_clip_iter(spec, 0, tok),
        ("clipkit", 0): lambda: clipkit_iter(spec, 0, tok),
    }
    if base_tree is not None:
        runs[("clipkit@" + args.baseline, W)] = None
        runs[("clipkit@" + args.baseline, 0)] = None
    dev_row = "clipkit, data.decode=device"
    if args.device_decode:
        runs[(dev_row, W)] = lambda: clipkit_iter(spec, W, tok, decode="device")
    results: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
    for rep in range(args.reps):  # interleaved, so drift on a shared machine hits all alike
        for key, make in runs.items():
            nb = args.batches if key[1] else args.batches // 2
            if make is None:
                results[key].append(baseline_rate(base_tree, spec, key[1], nb))
            else:
                results[key].append(measure(make, nb))
            print(
                f"  rep {rep}: {key[0]:<24} workers={key[1]}  {results[key][-1]:7.1f} samples/s",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n| pipeline | {W} workers, samples/s | 0 workers, samples/s |\n|---|---|---|")
    names = ["open_clip", "clipkit", "clipkit + CPU normalize"]
    names += ["clipkit@" + args.baseline] if base_tree is not None else []
    names += [dev_row] if args.device_decode else []
    for name in names:
        zero = f"{med[(name, 0)]:.0f}" if (name, 0) in med else "-"
        print(f"| {name} | {med[(name, W)]:.0f} | {zero} |")
    raw = raw_read_rate(urls[:2])
    dec = decode_rates(urls[0])
    print(
        f"\nphysical limits (1 core): raw tar read {raw:.0f} samples/s; "
        + "; ".join(f"{k} {v:.0f} img/s" for k, v in dec.items())
    )
    cores = min(W, os.cpu_count() or 1) if W else 1
    limit = cores * max(dec.values())
    print(
        f"clipkit ({W} workers) reaches {med[('clipkit', W)] / limit:.2f} of the {cores}-core "
        f"full-size decode limit ({limit:.0f} img/s; DCT-scaled decoding can exceed it)"
    )
    print(f"speedup vs open_clip (0 workers): {med[('clipkit', 0)] / med[('open_clip', 0)]:.2f}x")
    if args.device_decode:
        ratio = med[(dev_row, W)] / med[("clipkit", W)]
        print(f"decode on device / in workers ({W} workers): {ratio:.2f}x")
    if base_tree is not None:
        base = "clipkit@" + args.baseline
        ratio0 = med[("clipkit", 0)] / med[(base, 0)]
        print(f"clipkit vs {base} (0 workers, one core): {ratio0:.2f}x samples/s per core")
        ratio = med[("clipkit", W)] / med[(base, W)]
        print(f"clipkit vs {base} ({W} workers): {ratio:.2f}x samples/s per core")
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)])
    print(f"speedup vs open_clip ({W} workers): {med[('clipkit', W)] / med[('open_clip', W)]:.2f}x")
    return 0


def wds_warm(urls: list[str]):
    """Read every shard once so both pipelines start with a warm page cache."""
    for u in urls:
        with open(u, "rb") as f:
            while f.read(1 << 22):
                pass
        yield u


if __name__ == "__main__":
    raise SystemExit(main())
