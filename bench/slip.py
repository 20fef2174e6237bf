"""SLIP vs CLIP at equal steps on CIFAR-10 caption shards (issue 13).

Both runs are the real trainer (``scripts/train.py --config configs/slip_cifar10.yaml``) in a
fresh subprocess each, with the same model (the tiny ViT ``configs/models/clipkit-cifar.json``
from scratch), data (CIFAR-10 train shards built as ``bench/train.py`` builds them: captions =
class names), batch, steps, seed, AdamW settings, schedule, precision (fp32) and 2 loader workers;
CLIP is ``loss.ssl_weight=0``, SLIP ``loss.ssl_weight=1.0`` (NT-Xent T 0.1 on two ``simclr``-recipe
views through SLIP's 3-layer head, 512 hidden, 128 out). In-training evaluation is off; each export
is then evaluated through the library's CLI / driver on the same data:

* ``clipkit eval zeroshot`` on the CIFAR-10 test set (10,000 images, OpenAI's 18 templates);
* ``clipkit eval knn`` (k 200, T 0.1) and ``clipkit eval linear-probe --protocol clip`` on the
  CLIP image embedding, TEST = the test set, TRAIN = the first ``--probe-train-per-class``
  training images of each class (0 = all 50,000), features cached once per model for both.
  (The CLIP protocol's C search on 10,000 TRAIN rows took ~5 min per model on 2 shared cores;
  with 300 per class the measured run took 25.4 minutes, both trainings and all evaluations.)

Throughput = median training samples/s over the logged intervals after the first.

    flock /tmp/clipkit-bench.lock python bench/slip.py --steps 100 --batch 128 \
        --probe-train-per-class 300 | tee bench/results/cpu_slip.log
    python bench/slip.py --steps 3 --batch 32 --probe-train-per-class 20 \
        --test-per-class 20    # smoke run

Last line: ``SLIP vs CLIP: zero-shot acc1 +X.XX, kNN acc1 +X.XX, linear probe acc1 +X.XX points
(SLIP - CLIP); training time SLIP / CLIP Y.YYx``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _shards import say, train_shards  # bench/_shards.py

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLIPKIT_DATA", REPO.parent / "shared" / "data"))
CONFIG = REPO / "configs" / "slip_cifar10.yaml"
RUNS = {"clip": 0.0, "slip": 1.0}  # run -> loss.ssl_weight


def cut(src: Path, dst: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class of an ImageFolder tar (0: the tar itself)."""
    if per_class <= 0:
        return src
    seen: dict[str, int] = {}
    with tarfile.open(src) as tf, tarfile.open(dst, "w") as out:
        for m in tf:
            if not m.isfile():
                continue
            cls = m.name.removeprefix("./").split("/")[0]
            if seen.get(cls, 0) < per_class:
                seen[cls] = seen.get(cls, 0) + 1
                out.addfile(m, tf.extractfile(m))
    return dst


def run_train(name: str, spec: str, args, work: Path) -> dict:
    """One training run in a fresh subprocess; returns its speed, wall time and losses."""
    out = work / name
    cmd = [
        sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(CONFIG),
        f"data.train={spec}", f"data.workers={args.workers}",
        f"loss.ssl_weight={RUNS[name]}",
        f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.seed={args.seed}", "train.precision=fp32", f"train.output_dir={out}",
        f"train.log_every={args.log_every}", "train.trackers=[]", "train.checkpoint_every=0",
        f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup}", "optim.grad_clip=0",
        "eval.zeroshot=", "eval.knn=", "eval.knn_train=", "eval.every=0",
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{name} training failed:\n{(res.stdout + res.stderr)[-3000:]}")
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "train/loss" in x]
    rates = [x["train/samples_per_s"] for x in steps]
    last = steps[-1]
    return {
        "export": out / "export",
        "sps": statistics.median(rates[1:] or rates),
        "wall": wall,
        "loss": last["train/loss"],
        "loss_clip": last.get("train/loss_clip", last["train/loss"]),
        "loss_ssl": last.get("train/loss_ssl"),
    }


def evaluate(kind: str, export: Path, test: Path, train: Path, work: Path, args) -> dict:
    """``clipkit eval <kind>`` on ``export``; returns the JSON's metrics."""
    out = work / f"{export.parent.name}_{kind}.json"
    cmd = [
        sys.executable, "-m", "clipkit.cli", "eval", kind, "--model", str(export),
        "--data", str(test), "--output", str(out), "--batch-size", "500",
        "--workers", str(args.workers), "--no-progress",
    ]  # fmt: skip
    if kind == "zeroshot":
        cmd += ["--classnames", "cifar10", "--templates", "cifar10"]
    else:
        cmd += ["--train", str(train), "--cache-dir", str(work / "features")]
    if kind == "knn":
        cmd += ["--k", "200", "--temperature", "0.1"]
    if kind == "linear-probe":
        cmd += ["--protocol", "clip"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"clipkit eval {kind} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return json.loads(out.read_text())["metrics"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--probe-train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=0, help="0: the full test set")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "clipkit" / "bench"))
    args = p.parse_args()
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    spec = train_shards(Path(args.cache))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        train = cut(DATA / "cifar10" / "train.tar", work / "train.tar", args.probe_train_per_class)
        test = cut(DATA / "cifar10" / "test.tar", work / "test.tar", args.test_per_class)
        for name in RUNS:
            r = run_train(name, spec, args, work)
            say(f"{name}: trained in {r['wall']:.0f} s ({r['sps']:.1f} samples/s)")
            for kind in ("zeroshot", "knn", "linear-probe"):
                t0 = time.perf_counter()
                r[kind] = evaluate(kind, r["export"], test, train, work, args)
                say(f"{name}: {kind} acc1 {r[kind]['acc1']:.4f} ({time.perf_counter() - t0:.0f} s)")
            results[name] = r
    load1 = os.getloadavg()
    n_train = "all" if args.probe_train_per_class <= 0 else 10 * args.probe_train_per_class
    n_test = "all 10,000" if args.test_per_class <= 0 else 10 * args.test_per_class
    say(
        f"CIFAR-10 caption shards, {args.steps} steps x batch {args.batch}, fp32, seed "
        f"{args.seed}, {args.workers} workers, model clipkit-cifar; test images: {n_test}; "
        f"kNN / probe TRAIN: {n_train} images"
    )
    say(
        f"{'run':<5} {'samples/s':>9} {'wall s':>7} {'loss':>7} {'clip':>7} {'ssl':>7} "
        f"{'zs acc1':>8} {'zs acc5':>8} {'kNN acc1':>9} {'probe acc1':>11}"
    )
    for name, r in results.items():
        ssl = f"{r['loss_ssl']:.3f}" if r["loss_ssl"] is not None else "-"
        say(
            f"{name:<5} {r['sps']:>9.1f} {r['wall']:>7.1f} {r['loss']:>7.3f} "
            f"{r['loss_clip']:>7.3f} {ssl:>7} {r['zeroshot']['acc1']:>8.4f} "
            f"{r['zeroshot']['acc5']:>8.4f} {r['knn']['acc1']:>9.4f} "
            f"{r['linear-probe']['acc1']:>11.4f}"
        )
    c, s = results["clip"], results["slip"]
    say(
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; total wall "
        f"{time.perf_counter() - t_start:.0f} s"
    )
    gap = {k: 100 * (s[k]["acc1"] - c[k]["acc1"]) for k in ("zeroshot", "knn", "linear-probe")}
    say(
        f"SLIP vs CLIP: zero-shot acc1 {gap['zeroshot']:+.2f}, kNN acc1 {gap['knn']:+.2f}, "
        f"linear probe acc1 {gap['linear-probe']:+.2f} points (SLIP - CLIP); training time "
        f"SLIP / CLIP {s['wall'] / c['wall']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
