#!/usr/bin/env bash
# Data path on the GPU machine (16 CPU cores), for the lead to run (~5 min):
#   1. loader.normalize on CUDA equals the CPU result (uint8 batches are normalised on device);
#   2. bench/data.py with 8 workers and with 2 (clipkit vs open_clip, samples/s, same corpus),
#      with the per-core CPU profile and clipkit's data.decode=device row (issue 15: nvJPEG).
# Usage: bash bench/gpu_data.sh [DATA_ROOT]   (DATA_ROOT holds coco_mini/; default ../shared/data)
set -euo pipefail
DATA=${1:-../shared/data}
export HF_HUB_OFFLINE=1
python - <<'PY'
import torch
from clipkit.data import normalize
x = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8)
m, s = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
cpu = normalize(x, m, s)
gpu = normalize(x.cuda(non_blocking=True), m, s).cpu()
print("normalize cuda vs cpu max abs diff:", (cpu - gpu).abs().max().item())
assert (cpu - gpu).abs().max().item() < 1e-5
PY
flock /tmp/clipkit-bench.lock python bench/data.py --data-root "$DATA" --workers 8 --reps 3 --batches 120 --profile --device-decode
flock /tmp/clipkit-bench.lock python bench/data.py --data-root "$DATA" --workers 2 --reps 3 --batches 60 --device-decode
