"""clipkit's trainer vs open_clip's own trainer, side by side on the same data and model.

Both train the same tiny ViT CLIP (configs/models/clipkit-cifar.json) from scratch on CIFAR-10
train shards built by ``data_tools.build_shards`` (captions = class names), with the same batch,
steps, AdamW settings, schedule, precision (fp32) and 2 loader workers, each in a fresh
subprocess. Throughput = median samples/s over the logged intervals after the first (start-up
excluded). Then both models are evaluated zero-shot on CIFAR-10 test with the same evaluator
(clipkit eval zeroshot, OpenAI's 18 CIFAR templates).

    python bench/train.py [--steps 150] [--batch 128]

Last line: ``speedup vs open_clip: X.XXx`` (clipkit samples/s / open_clip samples/s).
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


def run_clipkit(spec: str, args, work: Path) -> tuple[list[float], Path, float]:
    out = work / "ck_run"
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
    args = p.parse_args()
    spec = build_shards(Path(args.cache))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        oc_rates, oc_ckpt, oc_wall = run_open_clip(spec, args, work)
        ck_rates, ck_export, ck_wall = run_clipkit(spec, args, work)
        oc_zs = zero_shot(open_clip_to_export(oc_ckpt, work / "oc_export"), work, "oc")
        ck_zs = zero_shot(ck_export, work, "ck")
    oc_sps = statistics.median(oc_rates[1:] or oc_rates)
    ck_sps = statistics.median(ck_rates[1:] or ck_rates)
    steps_s = lambda sps: sps / args.batch  # noqa: E731
    print(
        f"CIFAR-10 train shards, {args.steps} steps x batch {args.batch}, fp32, "
        f"{args.workers} workers, {torch.get_num_threads()} torch threads, model {MODEL.stem}"
    )
    print(
        f"{'trainer':<10} {'samples/s':>10} {'steps/s':>8} {'wall s':>7} {'zs acc1':>8} "
        f"{'zs acc5':>8}"
    )
    for name, sps, wall, zs in (
        ("open_clip", oc_sps, oc_wall, oc_zs),
        ("clipkit", ck_sps, ck_wall, ck_zs),
    ):
        print(
            f"{name:<10} {sps:>10.1f} {steps_s(sps):>8.2f} {wall:>7.1f} {zs['acc1']:>8.4f} "
            f"{zs['acc5']:>8.4f}"
        )
    print(f"zero-shot acc1 clipkit - open_clip: {ck_zs['acc1'] - oc_zs['acc1']:+.4f}")
    print(f"speedup vs open_clip: {ck_sps / oc_sps:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
