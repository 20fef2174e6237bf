#!/usr/bin/env bash
# GPU throughput check (run as one short script on a lent GPU): clipkit's trainer vs open_clip's
# own trainer, ViT-B-32, bf16 autocast, the same global batch, the same synthetic JPEG shards
# (8 x 1,000 images, 256-384 px), 8 loader workers each. Prints samples/s (median of the logged
# intervals after the first) and peak CUDA memory for both, and the ratio; then clipkit again with
# exact dynamic text length off (issue 18; FIXED_LENGTH_ROW=0 skips it) and the on/off ratio;
# then clipkit with data.decode=device (issue 15: nvJPEG decode, crop and resize on the GPU;
# DEVICE_DECODE_ROW=0 skips it) and its ratio to the workers' decode.
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
# One clipkit run: ck_run NAME [extra overrides...] -> $WORK/NAME (metrics) and $WORK/NAME.log.
ck_run() {
  local name=$1; shift
  python scripts/train.py data.builtin= "data.train=$SPEC" data.workers=$W "model.name=$MODEL" \
    train.batch_size="$B" train.max_steps="$STEPS" optim.warmup_steps=10 optim.grad_clip=0 \
    train.precision="$PREC_CK" train.output_dir="$WORK/$name" train.log_every=10 \
    train.trackers=[] eval.zeroshot= "$@" > "$WORK/$name.log" 2>&1 \
    || { tail -30 "$WORK/$name.log"; exit 1; }
}
ck_run ck
# Issue 18: the same clipkit run with exact dynamic text length off (captions padded to 77).
if [ "${FIXED_LENGTH_ROW:-1}" = 1 ]; then ck_run ck_fixed model.dynamic_text_length=false; fi
# Issue 15: the same clipkit run with the JPEGs decoded on the GPU (data.decode=device).
if [ "${DEVICE_DECODE_ROW:-1}" = 1 ]; then ck_run ck_dev data.decode=device; fi
python - "$WORK" "$B" <<'PY'
import json, re, statistics, sys
work, B = sys.argv[1], int(sys.argv[2])
oc = open(f"{work}/oc.log").read()
oc_rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", oc)]
oc_mem = float((re.findall(r"open_clip peak_mem_gb ([\d.]+)", oc) or ["nan"])[-1])
import os
def clipkit_row(run):
    lines = [json.loads(l) for l in open(f"{work}/{run}/metrics.jsonl")]
    rates = [l["train/samples_per_s"] for l in lines if "train/samples_per_s" in l]
    mem = max([l.get("train/peak_mem_gb", float("nan")) for l in lines])
    data = [l["train/data_wait_frac"] for l in lines if "train/data_wait_frac" in l]
    return statistics.median(rates[1:]), mem, statistics.median(data[1:] or [float("nan")])
ck_s, ck_mem, ck_wait = clipkit_row("ck")
oc_s = statistics.median(oc_rates[1:])
oc_data = [float(d) / float(b) for d, b in re.findall(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)", oc)]
print(f"batch {B}: | trainer | samples/s | peak GiB | data-wait fraction |")
print(f"| open_clip | {oc_s:.0f} | {oc_mem:.2f} | {statistics.median(oc_data[1:] or [float('nan')]):.3f} |")
print(f"| clipkit   | {ck_s:.0f} | {ck_mem:.2f} | {ck_wait:.3f} |")
if os.path.isdir(f"{work}/ck_fixed"):
    fx_s, fx_mem, fx_wait = clipkit_row("ck_fixed")
    print(f"| clipkit, dynamic text length off | {fx_s:.0f} | {fx_mem:.2f} | {fx_wait:.3f} |")
    print(f"dynamic text length on / off: {ck_s / fx_s:.2f}x")
if os.path.isdir(f"{work}/ck_dev"):
    dv_s, dv_mem, dv_wait = clipkit_row("ck_dev")
    print(f"| clipkit, data.decode=device | {dv_s:.0f} | {dv_mem:.2f} | {dv_wait:.3f} |")
    print(f"decode on device / in workers: {dv_s / ck_s:.2f}x; vs open_clip: {dv_s / oc_s:.2f}x")
print(f"speedup vs open_clip: {ck_s / oc_s:.2f}x  memory ratio clipkit/open_clip: {ck_mem / oc_mem:.2f}")
PY
