#!/usr/bin/env bash
# GPU throughput check (run as one short script on a lent GPU): clipkit's trainer vs open_clip's
# own trainer, ViT-B-32, bf16 autocast, the same global batch, the same synthetic JPEG shards
# (8 x 1,000 images, 256-384 px), 8 loader workers each. Prints samples/s (median of the logged
# intervals after the first) and peak CUDA memory for both, and the ratio.
# Usage: bash bench/gpu_train.sh [BATCH] [STEPS]     (defaults 256, 60)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
B=${1:-256}; STEPS=${2:-60}; W=${WORKERS:-8}
MODEL=${MODEL:-ViT-B-32}          # an open_clip name or a JSON config path
OC_NAME=$(basename "$MODEL" .json)
PREC_OC=${PREC_OC:-amp_bf16}; PREC_CK=${PREC_CK:-bf16}
WORK=$(mktemp -d)
python - "$WORK/shards" <<'PY'
import io, sys, json, random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import numpy as np
from PIL import Image
import webdataset as wds
out = Path(sys.argv[1]); out.mkdir(parents=True)
WORDS = "red blue green dog cat car tree house boat bird sky road".split()
def shard(i):
    rng = np.random.default_rng(i)
    with wds.TarWriter(str(out / f"{i:05d}.tar")) as w:
        for j in range(1000):
            h, wd = rng.integers(256, 385, size=2)
            base = rng.integers(0, 255, size=(h // 8, wd // 8, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((int(wd), int(h)), Image.BILINEAR)
            buf = io.BytesIO(); img.save(buf, format="JPEG", quality=90)
            cap = " ".join(random.Random(i * 1000 + j).choices(WORDS, k=6))
            w.write({"__key__": f"{i:05d}{j:04d}", "jpg": buf.getvalue(), "txt": cap})
    return i
with ProcessPoolExecutor(8) as ex: list(ex.map(shard, range(8)))
(out / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 1000 for i in range(8)}))
PY
SPEC="$WORK/shards/{00000..00007}.tar"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python bench/_open_clip_runner.py "$MODEL" -- --train-data "$SPEC" --dataset-type webdataset \
  --train-num-samples $((B * STEPS)) --epochs 1 --batch-size "$B" --workers $W --model "$OC_NAME" \
  --lr 5e-4 --wd 0.2 --warmup 10 --precision "$PREC_OC" --seed 0 --logs "$WORK/oc" --name oc \
  --log-every-n-steps 10 --save-frequency 0 --report-to "" > "$WORK/oc.log" 2>&1 || { tail -30 "$WORK/oc.log"; exit 1; }
python scripts/train.py data.builtin= "data.train=$SPEC" data.workers=$W "model.name=$MODEL" \
  train.batch_size="$B" train.max_steps="$STEPS" optim.warmup_steps=10 optim.grad_clip=0 \
  train.precision="$PREC_CK" train.output_dir="$WORK/ck" train.log_every=10 train.trackers=[] \
  eval.zeroshot= > "$WORK/ck.log" 2>&1 || { tail -30 "$WORK/ck.log"; exit 1; }
python - "$WORK" "$B" <<'PY'
import json, re, statistics, sys
work, B = sys.argv[1], int(sys.argv[2])
oc = open(f"{work}/oc.log").read()
oc_rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", oc)]
oc_mem = float((re.findall(r"open_clip peak_mem_gb ([\d.]+)", oc) or ["nan"])[-1])
lines = [json.loads(l) for l in open(f"{work}/ck/metrics.jsonl")]
ck_rates = [l["train/samples_per_s"] for l in lines if "train/samples_per_s" in l]
ck_mem = max([l.get("train/peak_mem_gb", float("nan")) for l in lines])
oc_s, ck_s = statistics.median(oc_rates[1:]), statistics.median(ck_rates[1:])
oc_data = [float(d) / float(b) for d, b in re.findall(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)", oc)]
ck_data = [l["train/data_wait_frac"] for l in lines if "train/data_wait_frac" in l]
print(f"batch {B}: | trainer | samples/s | peak GiB | data-wait fraction |")
print(f"| open_clip | {oc_s:.0f} | {oc_mem:.2f} | {statistics.median(oc_data[1:] or [float('nan')]):.3f} |")
print(f"| clipkit   | {ck_s:.0f} | {ck_mem:.2f} | {statistics.median(ck_data[1:] or [float('nan')]):.3f} |")
print(f"speedup vs open_clip: {ck_s / oc_s:.2f}x  memory ratio clipkit/open_clip: {ck_mem / oc_mem:.2f}")
PY
