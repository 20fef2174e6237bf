#!/usr/bin/env bash
# GPU check for the evaluators (lead runs this on a lent GPU; ~5 min on one H100).
# 1. The agreement tests (clipkit vs clip-benchmark, fp32; CPU code paths) still pass there.
# 2. Zero-shot CIFAR-10 test (10k images), clipkit vs clip-benchmark side by side on the GPU,
#    fp32, with a real-size architecture (ViT-B-32, fixed-seed random weights): both throughputs,
#    the ratio and whether the metrics agree within 1e-6.
# 3. Retrieval ranks at scale: 100k images x 500k captions (random unit vectors, d=512) in
#    bounded memory on the GPU: time and peak memory.
# Usage: bash bench/gpu_eval.sh   (data from $CLIPKIT_DATA, default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DATA="${CLIPKIT_DATA:-../shared/data}"
python -m pytest -q tests/eval/test_agreement.py -p no:cacheprovider
python bench/eval.py --device cuda --model open_clip:ViT-B-32 --data "$DATA/cifar10/test.tar" \
    --workers 8 --threads 8 --repeats 2
python - <<'PY'
import time, torch, torch.nn.functional as F
from clipkit.eval.retrieval import rank_metrics, retrieval_ranks
dev = torch.device("cuda")
print(torch.cuda.get_device_name())
n, m, d = 100_000, 500_000, 512
g = torch.Generator(device=dev).manual_seed(0)
img = F.normalize(torch.randn(n, d, device=dev, generator=g), dim=-1)
t2i = torch.arange(m, device=dev) % n
txt = F.normalize(img[t2i] + 6.0 * torch.randn(m, d, device=dev, generator=g) / d**0.5, dim=-1)
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
t0 = time.perf_counter()
t_rank, i_rank = retrieval_ranks(img, txt, t2i)
torch.cuda.synchronize()
sec = time.perf_counter() - t0
peak = (torch.cuda.max_memory_allocated() - base) / 2**20
print(f"100k x 500k retrieval ranks: {sec:.1f} s, peak {peak:.0f} MB above the embeddings")
print({k: round(v, 4) for k, v in rank_metrics(t_rank, i_rank).items()})
PY
