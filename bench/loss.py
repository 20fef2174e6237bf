"""Contrastive loss forward+backward on CPU: naive vs open_clip ClipLoss vs clipkit's tiled loss.

Each (B, implementation) case runs in a fresh subprocess whose address space is capped
(``--cap-mb`` above what the inputs already use), so a case that needs more memory prints OOM
instead of taking the machine down. Peak memory is the process's resident high-water mark
during the loss (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the
resident size just before, i.e. what the loss (logits, softmax, gradients) adds on top of the
``(B, d)`` inputs. Timings are one forward+backward after a small warm-up.

Run under the team's benchmark lock, e.g.::

    flock /tmp/clipkit-bench.lock python bench/loss.py
    flock /tmp/clipkit-bench.lock python bench/loss.py --batches 4096 8192 --chunk 256
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F
from _isolated import cell, spawn, status_kb

IMPLS = ("naive", "open_clip", "clipkit")


def _loss_fn(impl: str, chunk: int):
    if impl == "naive":

        def naive(q, k, s):
            logits = s * q @ k.T  # (B, B)
            labels = torch.arange(q.shape[0])
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

        return naive
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    from clipkit.losses import info_nce

    return lambda q, k, s: info_nce(q, k, s, chunk_size=chunk)


def run_case(impl: str, b: int, d: int, chunk: int, cap_mb: int, threads: int) -> dict:
    """One case in this (fresh) process; returns ``{"mb", "s"}`` or ``{"oom": True}``."""
    torch.set_num_threads(threads)
    fn = _loss_fn(impl, chunk)
    g = torch.Generator().manual_seed(0)

    def inputs(n: int):
        q = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
        k = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
        return q, k, torch.tensor(1 / 0.07, requires_grad=True)

    warm = inputs(512)
    fn(*warm).backward()  # start thread pools and allocator arenas before capping
    q, k, s = inputs(b)
    del warm
    vm = status_kb("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + cap_mb * 2**20, resource.RLIM_INFINITY))
    rss0 = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    try:
        t0 = time.perf_counter()
        loss = fn(q, k, s)
        loss.backward()
        dt = time.perf_counter() - t0
    except (RuntimeError, MemoryError) as err:
        if isinstance(err, MemoryError) or "memory" in str(err).lower():
            return {"oom": True}
        raise
    peak = status_kb("VmHWM")
    return {"mb": (peak - rss0) / 1024, "s": dt, "loss": float(loss.detach())}


def _spawn(impl: str, b: int, args: argparse.Namespace) -> dict:
    return spawn(
        __file__,
        ["--case", impl, "--batches", str(b), "--d", str(args.d), "--chunk", str(args.chunk),
         "--cap-mb", str(args.cap_mb)],
        args.threads,
    )  # fmt: skip


def _ratio(a: dict, b: dict, key: str) -> str:
    if key in a and key in b and b[key] > 0:
        return f"{a[key] / b[key]:.3f}"
    return "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--chunk", type=int, default=0, help="clipkit tile edge (0 = default)")
    p.add_argument("--cap-mb", type=int, default=6000, help="address-space cap per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--case", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        out = run_case(args.case, args.batches[0], args.d, args.chunk, args.cap_mb, args.threads)
        print(json.dumps(out))
        return 0
    from tqdm import tqdm

    cases = [(b, impl) for b in args.batches for impl in args.impls]
    results: dict[tuple[int, str], dict] = {}
    for b, impl in tqdm(cases, desc="loss bench", unit="case"):
        results[(b, impl)] = _spawn(impl, b, args)
    print(f"\nforward+backward, d={args.d}, fp32, CPU, {args.threads} threads, "
          f"clipkit chunk={args.chunk or 'default'}; cells: peak loss MB / seconds\n")  # fmt: skip
    head = " | ".join(args.impls)
    print(f"| B | {head} | clipkit/open_clip MB | clipkit/open_clip time | clipkit/naive time |")
    print("|---" * (len(args.impls) + 4) + "|")
    for b in args.batches:
        cells = " | ".join(cell(results[(b, i)], args.cap_mb) for i in args.impls)
        ck, oc, nv = (results.get((b, i), {}) for i in IMPLS[::-1])
        print(
            f"| {b:,} | {cells} | {_ratio(ck, oc, 'mb')} | {_ratio(ck, oc, 's')} | "
            f"{_ratio(ck, nv, 's')} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
