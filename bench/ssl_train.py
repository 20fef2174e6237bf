"""Self-supervised recipes on CIFAR-10: clipkit's trainer vs lightly 1.6's, side by side.

Issues 13 and 14: lightly's CIFAR-10 benchmark recipes (ResNet-18 with the CIFAR stem; SGD lr
0.06 x batch / 128, momentum 0.9, weight decay 5e-4, cosine; kNN k 200, T 0.1) trained by both,
same backbone module, batch, steps, optimiser, schedule, augmentation parameters, 2 loader
workers, fp32 and seed, each run in a fresh subprocess:

* SimCLR: 512-512-128 head, NT-Xent T 0.5, no blur.
* MoCo v2: 512-512-128 head, a 4,096-key memory bank, T 0.1, momentum 0.99 cosine to 1.
* BYOL: projector 512-1024-256, predictor 256-1024-256, negative cosine symmetrised, momentum
  0.99 cosine to 1, BYOL's asymmetric views.
* Barlow Twins: projector 512-2048-2048-2048, lambda 5e-3, BYOL's views (as the config).
* SwAV: projector 512-512-128, 512 prototypes (unit norm before every step, frozen for the
  first ``--swav-freeze`` steps), Sinkhorn epsilon 0.05, 3 iterations, T 0.1, 2 crops at 32 px.
* ``supervised`` (no lightly side): cross-entropy on the labels, the same backbone plus a
  linear classifier, one view per image with the SimCLR recipe's crop and flip
  (``bench/_supervised_runner.py``); the same optimiser, schedule, batch and steps.

Sides:

* clipkit: the real trainer, ``scripts/train.py --config configs/<method>_cifar10.yaml`` with
  dotted overrides for the batch, steps, learning rate, logging, SwAV's freeze and the
  in-training kNN (``eval.every`` = ``--knn-every``, the memory bank and test cut below); for
  BYOL, Barlow Twins and SwAV also ``ssl.blur_kernel=0``: lightly's transforms blur with PIL's
  radius (sigma 0.1-2 px), the shipped recipes with the papers' kernel of 10% of the side.
* lightly: ``bench/_lightly_ssl_runner.py``, a plain PyTorch loop with lightly's transforms,
  heads, losses and momentum utilities over a torch DataLoader on the same tar; it saves its
  backbone at the same steps, evaluated afterwards.

Speed: training samples/s, the median of the logged intervals after the first, leaving out on
both sides the intervals right after a kNN step (clipkit's in-training evaluation, lightly's
backbone save); each interval includes its data waits, logged the same way on both sides.
kNN: the same evaluator on every backbone (``clipkit.eval.driver.evaluate`` with ``clipkit eval
knn``'s evaluator: in clipkit's loop for clipkit, in this process for the saved lightly and
supervised backbones, loaded into clipkit's ``SSLModel`` with a strict state-dict load, which
also checks the backbones are the same module), k 200, T 0.1, on the CIFAR-10 test set (or
``--knn-test-per-class`` images per class) against a fixed class-balanced memory bank of
``--knn-train-per-class`` training images per class (the first ones of each class in the tar's
order; 0 = all 50,000), at every ``--knn-every`` steps and at the end. The order of the two
sides alternates by method (lightly first for the first method, clipkit first for the next), so
background load on a shared machine does not favour one side.

Run under the team's benchmark lock (the script takes it itself when nobody holds it; with
``flock(1)`` around it, it sees its parent holds it)::

    flock /tmp/clipkit-bench.lock python bench/ssl_train.py \
        --methods simclr,moco,byol,barlow_twins,swav,supervised --steps 16 --batch 128 \
        --plot bench/results/ssl_knn_steps.png | tee bench/results/cpu_ssl_all.log
    python bench/ssl_train.py --methods byol,barlow_twins,swav --steps 2 --batch 16 \
        --train-per-class 32 --knn-train-per-class 10 --knn-test-per-class 10 --no-lock  # smoke

Last line: ``ssl vs lightly: worst kNN gap +X.XX points, slowest speed ratio Y.YYx`` (gap: the
largest lightly - clipkit final kNN top-1 over the SSL methods, signed; ratio: the smallest
clipkit / lightly samples/s; the supervised baseline is not in it).
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
SSL_METHODS = ("simclr", "moco", "byol", "barlow_twins", "swav")  # configs/<m>_cifar10.yaml
BASELINE = "supervised"  # no lightly side
HEAD_LR = 0.06  # lightly's CIFAR-10 recipe: lr 0.06 x batch / 128
# configs/swav_cifar10.yaml freezes the prototypes for 313 of its 800 x 97 = 77,600 steps; the
# bench scales that fraction to its own run, at least 1 step (--swav-freeze overrides).
SWAV_FREEZE, FULL_STEPS = 313, 77_600


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


def knn_steps(args: argparse.Namespace) -> list[int]:
    """The steps kNN is measured at: every ``--knn-every`` steps, and the last."""
    every = args.knn_every
    return sorted({*(range(every, args.steps, every) if every else ()), args.steps})


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
        f"eval.knn={args.knn_test}", f"eval.knn_train={args.knn_train}", "eval.knn_k=200",
        "eval.knn_temperature=0.1", "eval.batch_size=256", f"eval.every={args.knn_every}",
    ]  # fmt: skip
    if method == "swav":
        cmd.append(f"ssl.freeze_prototypes_steps={args.swav_freeze}")
    if method in ("byol", "barlow_twins", "swav"):
        # lightly's BYOL and SwAV transforms blur with PIL's radius (sigma 0.1-2 px), not the
        # papers' kernel of 10% of the side (3 px at 32 px): the same views need the same blur.
        cmd.append("ssl.blur_kernel=0")
    wall = _run(cmd, f"clipkit {method}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/samples_per_s" in r]
    curve = {}
    for r in rows:
        acc = [v for k, v in r.items() if k.startswith("eval/knn/") and k.endswith("/acc1")]
        if acc:
            curve[int(r["step"])] = 100.0 * acc[0]
    if args.steps not in curve:
        raise SystemExit(f"clipkit {method}: no final kNN in {out / 'metrics.jsonl'}")
    return {
        "steps": [int(r["step"]) for r in train],
        "rates": [r["train/samples_per_s"] for r in train],
        "wait": [r["train/data_wait_frac"] for r in train],
        "loss": train[-1]["train/loss"],
        "wall": wall,
        "curve": curve,
    }


def run_plain(method: str, args: argparse.Namespace, work: Path) -> dict:
    """lightly's side of an SSL method, or the supervised baseline (``bench/_*_runner.py``)."""
    side = "supervised" if method == BASELINE else "lightly"
    out = work / f"{side}_{method}"
    steps = knn_steps(args)
    runner = "_supervised_runner.py" if side == "supervised" else "_lightly_ssl_runner.py"
    cmd = [
        sys.executable, str(REPO / "bench" / runner),
        "--train", str(args.train), "--steps", str(args.steps),
        "--batch", str(args.batch), "--lr", str(HEAD_LR * args.batch / 128),
        "--workers", str(args.workers), "--seed", str(args.seed),
        "--log-every", str(args.log_every), "--out", str(out),
        "--save-steps", ",".join(map(str, steps[:-1])),
    ]  # fmt: skip
    if side == "lightly":
        cmd += ["--method", method, "--swav-freeze", str(args.swav_freeze)]
        if method == "moco":
            cmd += ["--moco-push", getattr(args, "lightly_moco_push", "each")]
    wall = _run(cmd, f"{side} {method}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    t0 = time.perf_counter()
    curve = {
        s: knn_of(out / ("backbone.pt" if s == args.steps else f"backbone_step{s}.pt"), args)
        for s in steps
    }
    return {
        "steps": [int(r["step"]) for r in rows],
        "rates": [r["samples_per_s"] for r in rows],
        "wait": [r["data_wait_frac"] for r in rows],
        "loss": rows[-1]["loss"],
        "wall": wall,
        "curve": curve,
        "knn_wall": time.perf_counter() - t0,
    }


def knn_of(backbone: Path, args: argparse.Namespace) -> float:
    """kNN top-1 (percent) of a saved ResNet-18 backbone state dict: clipkit's evaluator on
    clipkit's ``SSLModel`` (the strict load fails if the modules differ; the head is unused)."""
    import torch

    from clipkit.eval.driver import evaluate
    from clipkit.eval.knn_cli import EVALUATOR as KNN
    from clipkit.eval.knn_cli import KnnOptions
    from clipkit.models.ssl import SSLModel

    model = SSLModel("resnet18", "simclr", 512, 128, cifar_stem=True, image_size=32)
    state = torch.load(backbone, map_location="cpu", weights_only=True)
    model.backbone.load_state_dict(state, strict=True)
    model.eval()
    options = KnnOptions(train=str(args.knn_train), k=200, temperature=0.1)
    with torch.no_grad():
        rep = evaluate(
            KNN, model, str(args.knn_test), options, device="cpu", batch_size=256,
            workers=args.workers, precision="fp32",
        )  # fmt: skip
    return 100.0 * rep.scalars()["acc1"]


def speed(r: dict, args: argparse.Namespace) -> float:
    """Median samples/s over the logged intervals after the first, leaving out those that
    start right after a kNN step (they hold clipkit's evaluation / lightly's backbone save)."""
    marks = set(knn_steps(args))
    prev = [0, *r["steps"][:-1]]
    clean = [x for p, x in zip(prev[1:], r["rates"][1:]) if p not in marks]
    return statistics.median(clean or r["rates"][1:] or r["rates"])


def plot(results: dict, methods: list[str], path: Path) -> None:
    """kNN top-1 over steps: one solid line per method (clipkit; the supervised baseline),
    dashed for lightly's side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(methods):
        color = "k" if method == BASELINE else f"C{i}"
        for side, style in (("clipkit", "-"), ("supervised", "-"), ("lightly", "--")):
            r = results.get((method, side))
            if r is None:
                continue
            xs = sorted(r["curve"])
            label = method if side != "lightly" else f"{method} (lightly)"
            ax.plot(xs, [r["curve"][x] for x in xs], style, marker="o", color=color, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("CIFAR-10 kNN (k 200, T 0.1) over steps; dashed: lightly 1.6")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    valid = (*SSL_METHODS, BASELINE)
    p.add_argument("--methods", default="simclr,moco", help=f"comma-separated: {', '.join(valid)}")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=0, help="default: steps / 8, at least 1")
    p.add_argument("--knn-every", type=int, default=0, help="kNN curve step; 0: at the end only")
    p.add_argument("--swav-freeze", type=int, default=-1, help="default: 313 scaled, >= 1")
    p.add_argument("--plot", type=Path, default=None, help="PNG of kNN top-1 over steps")
    p.add_argument("--train", type=Path, default=DATA / "cifar10" / "train.tar")
    p.add_argument("--test", type=Path, default=DATA / "cifar10" / "test.tar")
    p.add_argument("--train-per-class", type=int, default=0, help="smoke runs; 0: all 50,000")
    p.add_argument("--knn-train-per-class", type=int, default=1000, help="0: all 50,000")
    p.add_argument("--knn-test-per-class", type=int, default=0, help="0: all 10,000")
    p.add_argument("--no-lock", action="store_true", help="smoke runs: do not take the lock")
    p.add_argument(
        "--lightly-moco-push",
        choices=("each", "once"),
        default="each",
        help="lightly's MoCo memory-bank pushes (see bench/_lightly_ssl_runner.py build())",
    )
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in valid]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad or 'nothing'}; valid: {', '.join(valid)}")
    if args.steps < 1 or args.batch < 2 or args.knn_every < 0:
        raise SystemExit("--steps must be >= 1, --batch >= 2 and --knn-every >= 0")
    for path in (args.train, args.test):
        if not path.is_file():
            raise SystemExit(f"{path}: not found (set CLIPKIT_DATA)")
    args.log_every = args.log_every or max(1, args.steps // 8)
    if args.knn_every and args.knn_every % args.log_every:
        raise SystemExit(
            f"--knn-every {args.knn_every} must be a multiple of --log-every {args.log_every} "
            "(the intervals after a kNN step are left out of the speed)"
        )
    if args.swav_freeze < 0:
        args.swav_freeze = max(1, round(SWAV_FREEZE * args.steps / FULL_STEPS))
    ssl = [m for m in methods if m != BASELINE]

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
            f"steps; training images: {trained} of {args.knn_train_src.name}; kNN k 200 T 0.1 "
            f"at steps {', '.join(map(str, knn_steps(args)))}, memory bank: {bank} of "
            f"{args.knn_train_src.name}, test: {test} of {args.test.name}; SwAV prototypes "
            f"frozen for {args.swav_freeze} step(s)")  # fmt: skip
        for method in methods:
            if method == BASELINE:
                sides = ("supervised",)
            else:
                sides = (
                    ("lightly", "clipkit") if ssl.index(method) % 2 == 0 else ("clipkit", "lightly")
                )
            for side in sides:
                before = loadavg()
                r = (run_clipkit if side == "clipkit" else run_plain)(method, args, work)
                r["load"] = f"{before} -> {loadavg()}"
                curve = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(r["curve"].items()))
                extra = f" (+{r['knn_wall']:.0f} s)" if "knn_wall" in r else " (kNN included)"
                say(f"  {method:<12} {side:<10} trained in {r['wall']:.0f} s{extra}, samples/s "
                    f"per interval: {', '.join(f'{x:.1f}' for x in r['rates'])}; data-wait "
                    f"fraction median {statistics.median(r['wait']):.3f}; final loss "
                    f"{r['loss']:.4f}; kNN top-1 by step {{{curve}}}; "
                    f"load {r['load']}")  # fmt: skip
                results[method, side] = r
    load_end = loadavg()

    def rows(method: str) -> list[tuple[str, str]]:
        if method == BASELINE:
            return [("supervised", "supervised (no lightly side)")]
        return [("lightly", "lightly"), ("clipkit", "clipkit")]

    say("\n| method | side | steps | batch | samples/s | kNN top-1 | train wall s | final loss |")
    say("|---|---|---|---|---|---|---|---|")
    for method in methods:
        for side, shown in rows(method):
            r = results[method, side]
            say(f"| {method} | {shown} | {args.steps} | {args.batch} | {speed(r, args):.1f} | "
                f"{r['curve'][args.steps]:.2f} | {r['wall']:.0f} | {r['loss']:.4f} |")  # fmt: skip
    marks = knn_steps(args)
    say("\nkNN top-1 over steps:\n")
    say("| method | side | " + " | ".join(f"step {s}" for s in marks) + " |")
    say("|---|---|" + "---|" * len(marks))
    for method in methods:
        for side, shown in rows(method):
            r = results[method, side]
            say(
                f"| {method} | {shown} | "
                + " | ".join(f"{r['curve'][s]:.2f}" for s in marks)
                + " |"
            )
    if args.plot is not None:
        plot(results, methods, args.plot)
        say(f"\nplot: {args.plot}")
    gaps, ratios = [], []
    say("")
    for method in ssl:
        ck, lt = results[method, "clipkit"], results[method, "lightly"]
        gap = lt["curve"][args.steps] - ck["curve"][args.steps]
        ratio = speed(ck, args) / speed(lt, args)
        gaps.append(gap)
        ratios.append(ratio)
        say(f"{method}: kNN lightly - clipkit {gap:+.2f} points, speed clipkit / lightly "
            f"{ratio:.2f}x")  # fmt: skip
    say(f"load average at start {load_start}, at end {load_end}; total wall "
        f"{time.perf_counter() - t_start:.0f} s")  # fmt: skip
    if lock is not None:
        lock.close()
    if not ssl:
        say("ssl vs lightly: no SSL method run (the supervised baseline has no lightly side)")
        return 0
    say(f"ssl vs lightly: worst kNN gap {max(gaps):+.2f} points, "
        f"slowest speed ratio {min(ratios):.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
