#!/usr/bin/env bash
# GPU check for the loss core (lead runs this on a lent GPU; < 2 min on one H100).
# clipkit's tiled info_nce vs open_clip's ClipLoss, forward+backward, d=512, B in {32k, 64k},
# fp32 and bf16 inputs: peak CUDA memory of the loss (above the inputs) and median time of 3
# runs after a warm-up, plus the loss/gradient agreement where open_clip fits in memory.
# Issue 15's bf16 check ends the log: at B = 32,768 bf16, each chunk's time and peak memory as
# ratios to open_clip's bf16 ClipLoss (targets <= 1.5x, <= 1/25) and its loss against the fp32
# tiled loss of the unrounded inputs (target <= 1e-3 relative).
# Usage: bash bench/gpu_loss.sh [chunk ...]   (default chunks: 1024 2048 4096)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python - "$@" <<'PY'
import statistics, sys, time
import torch, torch.nn.functional as F
from open_clip.loss import ClipLoss
from clipkit.losses import info_nce

assert torch.cuda.is_available(), "needs a CUDA device"
dev = torch.device("cuda")
chunks = [int(c) for c in sys.argv[1:]] or [1024, 2048, 4096]
print(torch.cuda.get_device_name(), "torch", torch.__version__)
print("| B | dtype | impl | peak MB | ms (median of 3) | rel. loss diff | rel. dq diff |")
print("|---|---|---|---|---|---|---|")

def run(fn, q0, k0, s0):
    out = None
    times = []
    for _ in range(4):
        q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()
        s = s0.detach().requires_grad_()
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        loss = fn(q, k, s); loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        out = (loss.detach().float(), q.grad.float())
        del q, k, s, loss
    return peak, statistics.median(times[1:]) * 1e3, out

res = {}
for b in (32768, 65536):
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=dev).manual_seed(0)
        q0 = F.normalize(torch.randn(b, 512, device=dev, generator=g), dim=-1).to(dt)
        k0 = F.normalize(torch.randn(b, 512, device=dev, generator=g), dim=-1).to(dt)
        s0 = torch.tensor(1 / 0.07, device=dev)
        ref = None
        impls = [("open_clip", ClipLoss())] + [
            (f"clipkit c={c}", lambda q, k, s, c=c: info_nce(q, k, s, chunk_size=c)) for c in chunks
        ]
        for name, fn in impls:
            try:
                peak, ms, out = run(fn, q0, k0, s0)
            except torch.cuda.OutOfMemoryError:
                print(f"| {b:,} | {str(dt)[6:]} | {name} | OOM | - | - | - |"); torch.cuda.empty_cache(); continue
            if ref is None and name == "open_clip":
                ref = out; dl = dq = "ref"
            elif ref is not None:
                dl = f"{abs(out[0] - ref[0]).item() / ref[0].abs().item():.1e}"
                dq = f"{(out[1] - ref[1]).abs().max().item() / ref[1].abs().max().item():.1e}"
            else:
                dl = dq = "-"
            print(f"| {b:,} | {str(dt)[6:]} | {name} | {peak:,.0f} | {ms:.1f} | {dl} | {dq} |", flush=True)
            res[b, dt, name] = (peak, ms, out[0].item())
            torch.cuda.empty_cache()

b, bf = 32768, torch.bfloat16
oc = res.get((b, bf, "open_clip"))
print(f"\nbf16 tiles at B = {b:,}, d = 512 (targets: time <= 1.5x, memory <= 1/25 of open_clip bf16; loss <= 1e-3 rel. of fp32 tiled)")
for c in chunks:
    name = f"clipkit c={c}"
    mine, ref32 = res.get((b, bf, name)), res.get((b, torch.float32, name))
    if mine is None or ref32 is None:
        print(f"{name}: missing (OOM)")
        continue
    rel = abs(mine[2] - ref32[2]) / abs(ref32[2])
    if oc is None:
        print(f"{name}: open_clip OOM; {mine[1]:.1f} ms, {mine[0]:,.0f} MB, loss rel. diff vs fp32 tiled {rel:.1e}")
    else:
        print(f"{name}: time {mine[1] / oc[1]:.2f}x open_clip, memory 1/{oc[0] / max(mine[0], 1e-9):.0f} of it, loss rel. diff vs fp32 tiled {rel:.1e}")
PY
