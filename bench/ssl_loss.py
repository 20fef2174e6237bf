"""NT-Xent forward+backward on CPU: clipkit's tiled ``nt_xent`` vs lightly 1.6's ``NTXentLoss``.

Issue 13's acceptance: at 2 x 8,192 views, d = 128, fp32, clipkit's peak memory <= 1/20 of
lightly's and its time <= 1.0x. Each implementation runs in a fresh subprocess (address space
capped at ``--cap-mb`` above what it already maps, so an OOM prints instead of taking the
machine down). Memory is the process's resident high-water mark over all full-size calls
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the resident size just
before: everything the loss adds on top of its ``(N, d)`` inputs (logits, softmax, gradients,
allocator slack), whichever allocator made it. That is honest on CPU, where torch has no
allocator statistics and tracemalloc does not see torch's tensors. Time: the median (and the
minimum) of the forward+backward calls after one warm-up call at the full size. The machines
are shared: ``--rounds`` alternate the two implementations (a fresh process each) and the time
ratio is the median of the rounds' ratios.

Run under the team's benchmark lock::

    flock /tmp/clipkit-bench.lock python bench/ssl_loss.py
    flock /tmp/clipkit-bench.lock python bench/ssl_loss.py --n 4096 --chunk 256

lightly is installed without its dependencies (``pip install --no-deps lightly==1.6.0``, as
.ci/run does); its losses import with torch alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from _isolated import cell, spawn, status_kb

IMPLS = ("clipkit", "lightly")


def _loss_fn(impl: str, temperature: float, chunk: int):
    if impl == "lightly":
        from lightly.loss import NTXentLoss

        return NTXentLoss(temperature)
    from clipkit.losses import nt_xent

    return lambda z1, z2: nt_xent(z1, z2, temperature, chunk_size=chunk)


def run_case(impl: str, args: argparse.Namespace) -> dict:
    """One implementation in this (fresh) process: ``{"mb", "s", "times", "loss"}`` or OOM."""
    torch.set_num_threads(args.threads)
    fn = _loss_fn(impl, args.temperature, args.chunk)
    g = torch.Generator().manual_seed(0)
    # Projection-head outputs (not normalised: both implementations normalise inside).
    z1 = torch.randn(args.n, args.d, generator=g).requires_grad_()
    z2 = torch.randn(args.n, args.d, generator=g).requires_grad_()
    fn(z1[:256], z2[:256]).backward()  # thread pools and allocator arenas, before the cap
    vm = status_kb("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + args.cap_mb * 2**20, resource.RLIM_INFINITY))
    # Memory from before the first full-size call: an allocator that keeps freed memory
    # resident must not hide the loss's buffers in the baseline.
    rss0 = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    try:
        z1.grad = z2.grad = None
        fn(z1, z2).backward()  # warm-up at the full size (counted in memory, not in time)
        times = []
        for _ in range(args.repeats):
            z1.grad = z2.grad = None
            t0 = time.perf_counter()
            loss = fn(z1, z2)
            loss.backward()
            times.append(time.perf_counter() - t0)
    except (RuntimeError, MemoryError) as err:
        if isinstance(err, MemoryError) or "memory" in str(err).lower():
            return {"oom": True}
        raise
    peak = status_kb("VmHWM")
    return {
        "mb": (peak - rss0) / 1024,
        "s": statistics.median(times),
        "min": min(times),
        "times": times,
        "loss": float(loss.detach()),
        "grad_norm": float(torch.cat([z1.grad, z2.grad]).norm()),
    }


def _spawn(impl: str, args: argparse.Namespace) -> dict:
    return spawn(
        __file__,
        ["--case", impl, "--n", str(args.n), "--d", str(args.d), "--temperature",
         str(args.temperature), "--chunk", str(args.chunk), "--repeats", str(args.repeats),
         "--cap-mb", str(args.cap_mb)],
        args.threads,
    )  # fmt: skip


def _merge(runs: list[dict]) -> dict:
    """One implementation over the rounds: peak of the peaks, all times, per-round medians."""
    if any("mb" not in r for r in runs):
        return next(r for r in runs if "mb" not in r)
    times = [t for r in runs for t in r["times"]]
    return {**runs[-1], "mb": max(r["mb"] for r in runs), "times": times,
            "s": statistics.median(times), "min": min(times),
            "round_s": [r["s"] for r in runs]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="images: 2n views")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--chunk", type=int, default=0, help="clipkit tile edge (0 = default)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per process")
    p.add_argument("--rounds", type=int, default=3, help="clipkit, lightly, clipkit, ...")
    p.add_argument("--cap-mb", type=int, default=12000, help="address-space cap per case")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return 0
    # Rounds alternate the implementations, so load from others on the shared machine falls on
    # both; the time ratio is taken per round, and its median reported.
    rounds = []
    for _ in range(args.rounds):
        rounds.append({impl: _spawn(impl, args) for impl in IMPLS})
    res = {impl: _merge([r[impl] for r in rounds]) for impl in IMPLS}
    ck, lt = res["clipkit"], res["lightly"]
    print(f"NT-Xent forward+backward, 2 x {args.n:,} views, d={args.d}, fp32, CPU, "
          f"{args.threads} threads, T={args.temperature}, clipkit chunk="
          f"{args.chunk or 'default'}; peak = resident high-water mark above the inputs, "
          f"time = median of {args.rounds} rounds x {args.repeats} runs\n")  # fmt: skip
    print("| implementation | peak MB | time s (runs) | loss |")
    print("|---|---|---|---|")
    for impl in IMPLS:
        r = res[impl]
        if "mb" in r:
            runs = ", ".join(f"{t:.2f}" for t in r["times"])
            print(f"| {impl} | {r['mb']:,.0f} | {r['s']:.2f} ({runs}) | {r['loss']:.6f} |")
        else:
            print(f"| {impl} | {cell(r, args.cap_mb, '{mb:,.0f} MB / {s:.2f} s', 60)} | | |")
    if "mb" in ck and "mb" in lt:
        print(f"\nloss difference {abs(ck['loss'] - lt['loss']):.2e}, gradient-norm difference "
              f"{abs(ck['grad_norm'] - lt['grad_norm']):.2e}")  # fmt: skip
        mem = ck["mb"] / max(lt["mb"], 1e-9)
        per_round = [a / b for a, b in zip(ck["round_s"], lt["round_s"])]
        speed = statistics.median(per_round)
        print("time ratio per round: " + ", ".join(f"{r:.2f}x" for r in per_round))
        print(f"clipkit vs lightly: memory {mem:.4f}x (1/{1 / mem:.0f}; target <= 1/20), "
              f"time {speed:.2f}x (median over rounds; best runs {ck['min'] / lt['min']:.2f}x; "
              "target <= 1.0x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
