"""SimCLR and MoCo v2 on CIFAR-10: clipkit's trainer vs lightly 1.6's recipe, side by side.

Issue 13's acceptance: lightly's CIFAR-10 benchmark recipe (ResNet-18 with the CIFAR stem,
SimCLR: 512-512-128 head, NT-Xent T 0.5, no blur; MoCo v2: 512-512-128 head, a 4,096-key
memory bank, T 0.1, momentum 0.99 cosine to 1; SGD lr 0.06 x batch / 128, momentum 0.9, weight
decay 5e-4, cosine; kNN k 200, T 0.1) trained by both, same backbone module, batch, steps,
optimiser, schedule, augmentation parameters, 2 loader workers, fp32 and seed, each run in a
fresh subprocess:

* clipkit: the real trainer, ``scripts/train.py --config configs/<method>_cifar10.yaml`` with
  dotted overrides for the batch, steps, learning rate and logging (in-training kNN off).
* lightly: ``bench/_lightly_ssl_runner.py``, a plain PyTorch loop with lightly's transforms,
  heads, losses and momentum utilities over a torch DataLoader on the same tar.

Speed: training samples/s, the median of the logged intervals after the first (start-up and
evaluation excluded; each interval includes its data waits), logged the same way on both sides.
kNN: the same evaluator on both sides' backbones (``clipkit eval knn`` on an SSL export; the
lightly backbone's weights are loaded into clipkit's ``SSLModel`` with a strict state-dict load,
which also checks that the two backbones are the same module), k 200, T 0.1, on the CIFAR-10 test
set against a fixed class-balanced memory bank of ``--knn-train-per-class`` training images per
class (the first ones of each class in the tar's order; 0 = all 50,000). The order of the two
sides alternates by method (lightly first for the first method, clipkit first for the next), so
background load on a shared machine does not favour one side.

Run under the team's benchmark lock (the script takes it itself when nobody holds it; with
``flock(1)`` around it, it sees its parent holds it)::

    flock /tmp/clipkit-bench.lock python bench/ssl_train.py --methods simclr,moco --steps 40 \
        --batch 128 | tee bench/results/cpu_ssl.log
    python bench/ssl_train.py --methods simclr,moco --steps 3 --batch 32 --train-per-class 64 \
        --knn-train-per-class 20 --knn-test-per-class 20 --no-lock    # smoke run (~1.5 min)

Last line: ``ssl vs lightly: worst kNN gap +X.XX points, slowest speed ratio Y.YYx`` (gap: the
largest lightly - clipkit kNN top-1 over the methods, signed; ratio: the smallest clipkit /
lightly samples/s).
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CLIPKIT_DATA", REPO.parent / "shared" / "data"))
LOCK = "/tmp/clipkit-bench.lock"
METHODS = {"simclr": "simclr", "moco": "moco_v2"}  # method -> clipkit's ssl.head
HEAD_LR = 0.06  # lightly's CIFAR-10 recipe: lr 0.06 x batch / 128


def say(*args: object) -> None:
    print(*args, flush=True)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --------------------------------------------------------------------------- the bench lock
def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return pids


def _lock_holders(path: str) -> set[int]:
    ino = os.stat(path).st_ino
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "FLOCK" in parts and parts[-3].endswith(f":{ino}"):
                holders.add(int(parts[-4]))
    return holders


def take_bench_lock():
    """Hold ``/tmp/clipkit-bench.lock`` for the run; returns the open file (or None) and a note.

    Already held by an ancestor (``flock(1)`` around this script): go on. Held by someone
    else: wait for it, saying so.
    """
    f = open(LOCK, "a")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f, f"{LOCK} taken"
    except BlockingIOError:
        holders = _lock_holders(LOCK)
        if holders & _ancestors():
            f.close()
            return None, f"{LOCK} held by flock(1) around this run"
        say(f"waiting for {LOCK} (held by pid {', '.join(map(str, sorted(holders)))}) ...")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f, f"{LOCK} taken after waiting"


# --------------------------------------------------------------------------- data
_OPENED: dict[Path, list] = {}


def subset_tar(src: Path, per_class: int, out: Path) -> Path:
    """The first ``per_class`` images of each class of an ImageFolder tar, as an ImageFolder
    tar (read through clipkit's input layer; 0: ``src`` itself)."""
    if per_class <= 0:
        return src
    from clipkit.data.sources import image_bytes, open_source

    taken: dict[int, int] = {}
    if src not in _OPENED:  # train.tar is cut twice (training, kNN bank): index it once
        _OPENED[src] = open_source(str(src)).items or []
    with tarfile.open(out, "w") as tf:
        for rec in _OPENED[src]:
            if taken.get(rec.label, 0) >= per_class:
                continue
            taken[rec.label] = taken.get(rec.label, 0) + 1
            data = image_bytes(rec.image)
            info = tarfile.TarInfo(rec.image.name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


# --------------------------------------------------------------------------- the two sides
def _run(cmd: list[str], what: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed ({res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return time.perf_counter() - t0


def run_clipkit(method: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"clipkit_{method}"
    cmd = [
        sys.executable, str(REPO / "scripts" / "train.py"),
        "--config", str(REPO / "configs" / f"{method}_cifar10.yaml"),
        f"data.train={args.train}", f"data.workers={args.workers}",
        f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"optim.lr={HEAD_LR * args.batch / 128}", "train.precision=fp32",
        f"train.seed={args.seed}", f"train.log_every={args.log_every}",
        "train.checkpoint_every=0", "train.trackers=[]", f"train.output_dir={out}",
        "eval.knn=", "eval.knn_train=",
    ]  # fmt: skip
    wall = _run(cmd, f"clipkit {method}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/samples_per_s" in r]
    return {
        "rates": [r["train/samples_per_s"] for r in rows],
        "wait": [r["train/data_wait_frac"] for r in rows],
        "loss": rows[-1]["train/loss"],
        "wall": wall,
        "export": out / "export",
    }


def run_lightly(method: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"lightly_{method}"
    cmd = [
        sys.executable, str(REPO / "bench" / "_lightly_ssl_runner.py"),
        "--method", method, "--train", str(args.train), "--steps", str(args.steps),
        "--batch", str(args.batch), "--lr", str(HEAD_LR * args.batch / 128),
        "--workers", str(args.workers), "--seed", str(args.seed),
        "--log-every", str(args.log_every), "--out", str(out),
    ]  # fmt: skip
    wall = _run(cmd, f"lightly {method}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "rates": [r["samples_per_s"] for r in rows],
        "wait": [r["data_wait_frac"] for r in rows],
        "loss": rows[-1]["loss"],
        "wall": wall,
        "export": lightly_export(method, out),
    }


def lightly_export(method: str, out: Path) -> Path:
    """The lightly run's backbone in clipkit's SSL export layout (the projector is clipkit's
    fresh head: kNN reads the backbone only). The strict load fails if the modules differ."""
    import torch

    from clipkit.models.ssl import SSLModel

    model = SSLModel("resnet18", METHODS[method], 512, 128, cifar_stem=True, image_size=32)
    state = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    model.backbone.load_state_dict(state, strict=True)
    return model.export(out / "export")


def knn(export: Path, args: argparse.Namespace, work: Path, name: str) -> tuple[float, float]:
    """``clipkit eval knn`` top-1 (percent) of an SSL export, and its wall time."""
    out = work / f"knn_{name}.json"
    cmd = [
        sys.executable, "-m", "clipkit.cli", "eval", "knn", "--model", str(export),
        "--train", str(args.knn_train), "--data", str(args.knn_test), "--k", "200",
        "--temperature", "0.1", "--batch-size", "256", "--workers", str(args.workers),
        "--precision", "fp32", "--device", "cpu", "--no-progress", "--output", str(out),
    ]  # fmt: skip
    wall = _run(cmd, f"kNN of {name}")
    return 100.0 * json.loads(out.read_text())["metrics"]["acc1"], wall


def speed(rates: list[float]) -> float:
    """Median samples/s over the logged intervals after the first (start-up excluded)."""
    return statistics.median(rates[1:] or rates)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="simclr,moco", help="comma-separated: simclr, moco")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=0, help="default: steps / 8, at least 1")
    p.add_argument("--train", type=Path, default=DATA / "cifar10" / "train.tar")
    p.add_argument("--test", type=Path, default=DATA / "cifar10" / "test.tar")
    p.add_argument("--train-per-class", type=int, default=0, help="smoke runs; 0: all 50,000")
    p.add_argument("--knn-train-per-class", type=int, default=1000, help="0: all 50,000")
    p.add_argument("--knn-test-per-class", type=int, default=0, help="0: all 10,000")
    p.add_argument("--no-lock", action="store_true", help="smoke runs: do not take the lock")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad or 'nothing'}; valid: {', '.join(METHODS)}")
    if args.steps < 1 or args.batch < 2:
        raise SystemExit("--steps must be >= 1 and --batch >= 2")
    for path in (args.train, args.test):
        if not path.is_file():
            raise SystemExit(f"{path}: not found (set CLIPKIT_DATA)")
    args.log_every = args.log_every or max(1, args.steps // 8)

    lock, lock_note = (None, "no lock (--no-lock)") if args.no_lock else take_bench_lock()
    load_start = loadavg()
    t_start = time.perf_counter()
    say(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {lock_note}; "
        f"load average at start {load_start} ({os.cpu_count()} CPUs)")  # fmt: skip
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="clipkit-ssl-bench-") as d:
        work = Path(d)
        args.knn_train_src = args.train
        args.train = subset_tar(args.train, args.train_per_class, work / "train.tar")
        args.knn_train = subset_tar(
            args.knn_train_src, args.knn_train_per_class, work / "knn_train.tar"
        )
        args.knn_test = subset_tar(args.test, args.knn_test_per_class, work / "knn_test.tar")
        bank = f"{args.knn_train_per_class:,}/class" if args.knn_train_per_class else "all"
        trained = f"{args.train_per_class:,}/class" if args.train_per_class else "all"
        test = f"{args.knn_test_per_class:,}/class" if args.knn_test_per_class else "all"
        say(f"{args.steps} steps x batch {args.batch} per run, lr {HEAD_LR * args.batch / 128:g}, "
            f"{args.workers} loader workers, fp32, seed {args.seed}, log every {args.log_every} "
            f"steps; training images: {trained} of {args.knn_train_src.name}; kNN k 200 T 0.1, "
            f"memory bank: {bank} of {args.knn_train_src.name}, test: {test} of "
            f"{args.test.name}")  # fmt: skip
        for i, method in enumerate(methods):
            sides = ("lightly", "clipkit") if i % 2 == 0 else ("clipkit", "lightly")
            for side in sides:
                before = loadavg()
                run = run_lightly if side == "lightly" else run_clipkit
                r = run(method, args, work)
                r["load"] = f"{before} -> {loadavg()}"
                say(f"  {method:<6} {side:<7} trained in {r['wall']:.0f} s, samples/s per "
                    f"interval: {', '.join(f'{x:.1f}' for x in r['rates'])}; data-wait "
                    f"fraction median {statistics.median(r['wait']):.3f}; final loss "
                    f"{r['loss']:.4f}; load {r['load']}")  # fmt: skip
                results[method, side] = r
            for side in ("lightly", "clipkit"):
                r = results[method, side]
                r["knn"], knn_wall = knn(r["export"], args, work, f"{side}_{method}")
                say(f"  {method:<6} {side:<7} kNN top-1 {r['knn']:.2f} ({knn_wall:.0f} s)")
    load_end = loadavg()

    say("\n| method | side | steps | batch | samples/s | kNN top-1 | train wall s | final loss |")
    say("|---|---|---|---|---|---|---|---|")
    for method in methods:
        for side in ("lightly", "clipkit"):
            r = results[method, side]
            say(f"| {method} | {side} | {args.steps} | {args.batch} | {speed(r['rates']):.1f} | "
                f"{r['knn']:.2f} | {r['wall']:.0f} | {r['loss']:.4f} |")  # fmt: skip
    gaps, ratios = [], []
    say("")
    for method in methods:
        ck, lt = results[method, "clipkit"], results[method, "lightly"]
        gap = lt["knn"] - ck["knn"]
        ratio = speed(ck["rates"]) / speed(lt["rates"])
        gaps.append(gap)
        ratios.append(ratio)
        say(f"{method}: kNN lightly - clipkit {gap:+.2f} points, speed clipkit / lightly "
            f"{ratio:.2f}x")  # fmt: skip
    say(f"load average at start {load_start}, at end {load_end}; total wall "
        f"{time.perf_counter() - t_start:.0f} s")  # fmt: skip
    if lock is not None:
        lock.close()
    say(f"ssl vs lightly: worst kNN gap {max(gaps):+.2f} points, "
        f"slowest speed ratio {min(ratios):.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
