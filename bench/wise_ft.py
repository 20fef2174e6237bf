"""WiSE-FT on CIFAR-10 (issue 16): fine-tune a clipkit-trained zero-shot CLIP on half of the
classes, then sweep the weight-space mix between the two.

1. Zero-shot model: CLIP from scratch with ``configs/slip_cifar10.yaml`` at ``loss.ssl_weight=0``
   (the tiny ViT ``configs/models/clipkit-cifar.json``) on the CIFAR-10 train caption shards that
   ``bench/train.py`` builds (captions = class names, all 10 classes), bench/train.py's settings
   (AdamW lr 5e-4, 20 warmup steps + cosine, no clipping, fp32).
2. Fine-tuned model: ``configs/finetune_cifar10.yaml`` with ``model.pretrained`` = that run, on
   caption shards (``data_tools.build_shards``) of the first ``--ft-per-class`` training images of
   the 5 fine-tuned classes only (airplane, automobile, bird, cat, deer), ``--ft-steps`` at
   ``--ft-lr`` (default 5e-4 x 150 steps; the config's 1e-4 x 80 steps barely moves this model).
3. ``clipkit wise-ft --alphas ...`` evaluates every mix zero-shot (OpenAI's 18 CIFAR-10
   templates) on the first ``--test-per-class`` test images of: the fine-tuned classes (5-way),
   the other 5 classes (5-way: zero-shot on classes the fine-tune never saw), and all 10
   (10-way). Each training run is a fresh subprocess of the real trainer.

    flock /tmp/clipkit-bench.lock python bench/wise_ft.py | tee bench/results/wise_ft.log
    # ~500 s on 2 quiet cores (bench/README.md)
    python bench/wise_ft.py --zs-steps 3 --ft-steps 2 --batch 16 --ft-per-class 20 \
        --test-per-class 10 --alphas 0,0.5,1      # smoke run

The sweep's table / JSON / plot are copied to ``--results`` (wise_ft.md, .json, .png).
Last line: ``WiSE-FT alpha A: fine-tuned classes X.XXXX (vs Y.YYYY at 1), other classes ...``
(the alpha with the best mean of the two 5-way accuracies).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shards import say, train_shards  # bench/_shards.py

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLIPKIT_DATA", REPO.parent / "shared" / "data"))
FT_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
OTHER_CLASSES = ("dog", "frog", "horse", "ship", "truck")
sys.path.insert(0, str(REPO))
from tests.cifar_cuts import cut_imagefolder_tar  # noqa: E402  (the one CIFAR cut helper)


def run(cmd: list[str], what: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return time.perf_counter() - t0


def train(config: str, out: Path, overrides: list[str], args) -> dict:
    """One trainer run in a fresh subprocess; its speed, wall time and last loss."""
    cmd = [
        sys.executable, str(REPO / "scripts" / "train.py"), "--config", config,
        f"data.workers={args.workers}", f"train.batch_size={args.batch}",
        f"train.seed={args.seed}", "train.precision=fp32", f"train.output_dir={out}",
        "train.log_every=10", "train.trackers=[]", "train.checkpoint_every=0",
        "optim.grad_clip=0", "eval.zeroshot=", "eval.every=0", *overrides,
    ]  # fmt: skip
    wall = run(cmd, f"training {out.name}")
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "train/loss" in x]
    rates = [x["train/samples_per_s"] for x in steps]
    return {"wall": wall, "sps": statistics.median(rates[1:] or rates), "loss": steps[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zs-steps", type=int, default=150, help="zero-shot model's steps")
    p.add_argument("--ft-steps", type=int, default=150, help="fine-tuning steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning lr (config: 1e-4)")
    p.add_argument("--ft-per-class", type=int, default=1000, help="train images per class")
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "clipkit" / "bench"))
    p.add_argument("--results", default="", help="copy the sweep's md/json/png here")
    p.add_argument("--work", default="", help="keep the runs here (default: a temp folder)")
    args = p.parse_args()
    t_start, load0 = time.perf_counter(), os.getloadavg()
    spec = train_shards(Path(args.cache))
    with tempfile.TemporaryDirectory() as d:
        work = Path(args.work or d)
        work.mkdir(parents=True, exist_ok=True)
        # data: fine-tune shards of 5 classes, test cuts of the 5, the other 5 and all 10
        part = cut_imagefolder_tar(
            DATA / "cifar10" / "train.tar", work / "ft_train.tar", args.ft_per_class,
            set(FT_CLASSES),
        )  # fmt: skip
        shards = work / "ft_shards"
        size = max(1, len(FT_CLASSES) * args.ft_per_class // 5)
        run(
            [sys.executable, "-m", "data_tools.build_shards", str(part), str(shards),
             "--shard-size", str(size), "--workers", str(args.workers)],
            "build_shards",
        )  # fmt: skip
        tars = sorted(shards.glob("*.tar"))
        ft_spec = f"{shards}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"
        test = DATA / "cifar10" / "test.tar"
        n = args.test_per_class
        sets = {
            "ft5": cut_imagefolder_tar(test, work / "ft5.tar", n, set(FT_CLASSES)),
            "other5": cut_imagefolder_tar(test, work / "other5.tar", n, set(OTHER_CLASSES)),
            "all10": cut_imagefolder_tar(test, work / "all10.tar", n),
        }
        # 1. the zero-shot model, 2. the fine-tuned one
        zs = train(
            str(REPO / "configs" / "slip_cifar10.yaml"), work / "zs_run",
            [f"data.train={spec}", "loss.ssl_weight=0", f"train.max_steps={args.zs_steps}",
             "optim.lr=5e-4", "optim.warmup_steps=20", "eval.knn=", "eval.knn_train="],
            args,
        )  # fmt: skip
        say(
            f"zero-shot model: {args.zs_steps} steps in {zs['wall']:.0f} s "
            f"({zs['sps']:.1f} samples/s)"
        )
        ft = train(
            str(REPO / "configs" / "finetune_cifar10.yaml"), work / "ft_run",
            [f"data.train={ft_spec}", f"model.pretrained={work / 'zs_run'}",
             f"train.max_steps={args.ft_steps}", f"optim.lr={args.ft_lr}"],
            args,
        )  # fmt: skip
        say(f"fine-tuned: {args.ft_steps} steps in {ft['wall']:.0f} s ({ft['sps']:.1f} samples/s)")
        # 3. the sweep
        out = work / "sweep"
        cmd = [
            sys.executable, "-m", "clipkit.cli", "wise-ft", "--zeroshot", str(work / "zs_run"),
            "--finetuned", str(work / "ft_run"), "--alphas", args.alphas, "--output", str(out),
            "--templates", "cifar10", "--batch-size", "500", "--workers", str(args.workers),
            "--device", "cpu", "--no-progress",
            *[a for name, tar in sets.items() for a in ("--eval", f"{name}={tar}")],
        ]  # fmt: skip
        sweep_s = run(cmd, "clipkit wise-ft")
        res = json.loads((out / "wise_ft.json").read_text())
        table = (out / "wise_ft.md").read_text()
        if args.results:
            dst = Path(args.results)
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("wise_ft.md", "wise_ft.json", "wise_ft.png"):
                shutil.copy(out / name, dst / name)
    load1 = os.getloadavg()
    say(
        f"CIFAR-10, model clipkit-cifar, batch {args.batch}, fp32, seed {args.seed}; zero-shot "
        f"model {args.zs_steps} steps on all 10 classes; fine-tuned {args.ft_steps} steps at lr "
        f"{args.ft_lr:g} on {len(FT_CLASSES) * args.ft_per_class} images of "
        f"{', '.join(FT_CLASSES)}; test: {n} images per class"
    )
    say(f"sweep: {len(res['points'])} alphas in {sweep_s:.0f} s")
    say(table.rstrip())
    say(
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; total wall "
        f"{time.perf_counter() - t_start:.0f} s"
    )
    pts = res["points"]
    acc = lambda pt, s: pt["metrics"][s]["acc1"]  # noqa: E731
    best = max(pts, key=lambda pt: acc(pt, "ft5") + acc(pt, "other5"))
    one = (
        next(pt for pt in pts if pt["alpha"] == 1.0)
        if 1.0 in [q["alpha"] for q in pts]
        else pts[-1]
    )
    zero = pts[0]
    say(
        f"WiSE-FT alpha {best['alpha']:g}: fine-tuned classes {acc(best, 'ft5'):.4f} (vs "
        f"{acc(one, 'ft5'):.4f} at {one['alpha']:g}, {acc(zero, 'ft5'):.4f} at {zero['alpha']:g}), "
        f"other classes {acc(best, 'other5'):.4f} (vs {acc(one, 'other5'):.4f}, "
        f"{acc(zero, 'other5'):.4f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
