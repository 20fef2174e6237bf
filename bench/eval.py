"""Zero-shot CIFAR-10 test (10k images): clipkit vs the ``clip-benchmark`` package, side by side.

Same model, same fp32 settings (``amp=False``), same batch size, DataLoader workers and torch
threads. clipkit reads ``cifar10/test.tar`` in place; CLIP_benchmark reads an extracted
ImageFolder copy through torchvision (extracted once into a temporary folder before timing, so
both read from the page cache). Prints both throughputs, the ratio and whether the metrics agree.
Timing runs must not overlap, so launch it under the team's lock::

    flock /tmp/clipkit-bench.lock python bench/eval.py                 # micro model, 1 thread
    flock /tmp/clipkit-bench.lock python bench/eval.py --model clipkit-tiny --limit 2000

Memory bound of chunked retrieval (synthetic unit vectors, no model)::

    flock /tmp/clipkit-bench.lock python bench/eval.py --scale 20000,100000

``--model``: an architecture name or JSON config (fixed-seed random weights), an export folder
or ``open_clip:ARCH``. ``--repeats R`` times each tool R times in the order A B B A ... and
reports the best run of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10" / "test.tar"
MICRO = REPO / "tests" / "eval" / "micro_clip.json"


def _model(spec: str):
    from clipkit.config.schema import ModelConfig
    from clipkit.eval.driver import load_model
    from clipkit.models import build_dual_encoder

    if spec.startswith("open_clip:") or Path(spec).is_dir():
        return load_model(spec).eval()
    torch.manual_seed(0)
    return build_dual_encoder(ModelConfig(name=spec)).eval()


def _peer_accuracy(output, target, topk=(1,)):
    # CLIP_benchmark 1.6.2's accuracy with .item() instead of float() of a 1-element array
    # (numpy >= 2.4 rejects that); same topk/eq/sum.
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def run_clipkit(model, data: str, idx, classnames, templates, bs: int, workers: int, dev: str):
    from clipkit.eval import zero_shot
    from clipkit.eval.datasets import labelled_loader, open_labelled

    t0 = time.perf_counter()
    ls = open_labelled(data, model.preprocess_eval)
    if idx is not None:
        ls.dataset = Subset(ls.dataset, idx)
    loader = labelled_loader(ls, batch_size=bs, workers=workers)
    out = zero_shot(model, loader, classnames, templates, batch_size=bs, device=dev)
    return out, time.perf_counter() - t0


def run_peer(model, folder: Path, idx, classnames, templates, bs: int, workers: int, dev: str):
    import clip_benchmark.metrics.zeroshot_classification as zsc
    from torchvision.datasets import ImageFolder

    zsc.accuracy = _peer_accuracy
    t0 = time.perf_counter()
    ds = ImageFolder(str(folder), transform=model.preprocess_eval)
    if idx is not None:
        classes = ds.classes
        ds = Subset(ds, idx)
        ds.classes = classes
    loader = DataLoader(ds, batch_size=bs, num_workers=workers)
    peer_templates = [t.replace("{}", "{c}") for t in templates]
    out = zsc.evaluate(model.clip, loader, model.tokenizer, classnames, peer_templates, dev,
                       amp=False)  # fmt: skip
    return out, time.perf_counter() - t0


def run_scale(spec: str, dim: int) -> int:
    """Time and peak RSS of retrieval_ranks on N images x M captions (M % N captions each)."""
    import resource

    import torch.nn.functional as F

    from clipkit.eval.retrieval import rank_metrics, retrieval_ranks

    n, m = (int(x) for x in spec.split(","))
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)  # (N, D)
    t2i = torch.arange(m) % n  # (M,)
    txt = F.normalize(img[t2i] + 6.0 * torch.randn(m, dim, generator=g) / dim**0.5, dim=-1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    t_rank, i_rank = retrieval_ranks(img, txt, t2i, progress=True)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    full = n * m * 4 / 2**20
    print(f"retrieval ranks N={n} M={m} d={dim} threads={torch.get_num_threads()}: {sec:.1f} s; "
          f"peak RSS {peak:.0f} MB (before {before:.0f} MB; one full float32 score matrix "
          f"would be {full:.0f} MB)")  # fmt: skip
    print({k: round(v, 4) for k, v in rank_metrics(t_rank, i_rank).items()})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 test tar (ImageFolder)")
    ap.add_argument("--model", default=str(MICRO))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both tools)")
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both tools)")
    ap.add_argument("--scale", default="", help="N,M: time chunked retrieval ranks instead")
    ap.add_argument("--dim", type=int, default=64, help="embedding size for --scale")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.scale:
        return run_scale(args.scale, args.dim)
    if not Path(args.data).is_file():
        print(f"bench/eval.py: data not found: {args.data}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clipkit.eval import load_classnames, load_templates

    model = _model(args.model).to(args.device)
    classnames, templates = load_classnames("cifar10"), load_templates("cifar10")
    idx = list(range(args.limit)) if args.limit else None
    n = args.limit or 10000
    with tempfile.TemporaryDirectory(prefix="clipkit-bench-") as tmp:
        with tarfile.open(args.data) as tf:
            tf.extractall(tmp, filter="data")
        times: dict[str, list[float]] = {"clipkit": [], "clip_benchmark": []}
        results = {}
        order = ["clip_benchmark", "clipkit"]
        for r in range(args.repeats):
            for tool in order if r % 2 == 0 else order[::-1]:
                if tool == "clipkit":
                    res, sec = run_clipkit(model, args.data, idx, classnames, templates,
                                           args.batch_size, args.workers, args.device)  # fmt: skip
                else:
                    res, sec = run_peer(model, Path(tmp), idx, classnames, templates,
                                        args.batch_size, args.workers, args.device)  # fmt: skip
                times[tool].append(sec)
                results[tool] = res
    print(f"model={args.model} images={n} batch={args.batch_size} workers={args.workers} "
          f"threads={args.threads} repeats={args.repeats} device={args.device} "
          f"torch={torch.__version__}")  # fmt: skip
    print(f"{'tool':<16}{'best s':>9}{'img/s':>9}   acc1     acc5     mpcr")
    for tool in ("clip_benchmark", "clipkit"):
        best = min(times[tool])
        m = results[tool]
        print(f"{tool:<16}{best:>9.2f}{n / best:>9.1f}   {m['acc1']:.4f}   {m['acc5']:.4f}   "
              f"{m['mean_per_class_recall']:.4f}")  # fmt: skip
    ratio = min(times["clip_benchmark"]) / min(times["clipkit"])
    agree = all(
        abs(results["clipkit"][k] - results["clip_benchmark"][k]) <= 1e-6
        for k in ("acc1", "acc5", "mean_per_class_recall")
    )
    print(
        f"speed ratio clipkit / clip_benchmark = {ratio:.2f}x; metrics agree within 1e-6: {agree}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
