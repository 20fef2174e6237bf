#!/usr/bin/env bash
# GPU check for the embedding API (lead runs this on a lent GPU; ~3 min on one H100).
# 1. The Embedder tests (CPU code paths) still pass there.
# 2. API vs raw batched forward on the GPU with a real-size architecture (ViT-B-32, random
#    weights), fp16 autocast on both sides and fp32 on both sides: the API / raw ratio (target
#    < 1.05) and the max abs difference (0 expected: same kernels, same batches).
# Usage: bash bench/gpu_embed.sh   (COCO-mini from $CLIPKIT_DATA, default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -m pytest -q tests/embed/test_embedder.py -p no:cacheprovider
nvidia-smi --query-gpu=name --format=csv,noheader
for prec in fp16 fp32; do
    python bench/embed.py --device cuda --precision "$prec" --model open_clip:ViT-B-32 \
        --images 1024 --texts 16384 --batch-size 256 --threads 8 --repeats 3
done
