"""Where an SSL training step's time goes: clipkit's trainer parts vs lightly 1.6's, one process.

``bench/ssl_train.py`` measures whole runs; this splits a step so a speed gap can be located.
Both sides train the same ResNet-18 (CIFAR stem) on the same batch of CIFAR-10 views:

* views: the CPU cost per image of one sample's two views (what each loader worker does):
  clipkit's ``make_views`` on the JPEG bytes vs lightly's transform on the PIL image, one
  thread, alternating image by image; thread CPU time, so other load on the machine barely
  moves it.
* step: one optimiser step of the main process on a fixed batch, phase by phase (forward +
  loss, backward, optimiser), alternating clipkit / lightly step by step. clipkit: the task's
  ``embed`` (device normalisation included), the registry's loss, the configured optimiser,
  ``after_step`` (momentum update, collapse guard); lightly: its recipe's step function (from
  ``bench/_lightly_ssl_runner.py``), SGD with the same settings. Wall time per phase, median
  over the steps.

``--processes`` runs each side alone in a fresh process, with glibc's allocator defaults and with
freed memory kept (:mod:`clipkit.train.allocator`), and adds the page faults per step.

Run under the team's benchmark lock::

    flock /tmp/clipkit-bench.lock python bench/ssl_step_profile.py --methods simclr,moco \
        --batch 128 --steps 6    # bench/results/cpu_ssl_step_profile_same_process.log
    flock /tmp/clipkit-bench.lock python bench/ssl_step_profile.py --methods simclr,moco \
        --batch 128 --steps 4 --images 200 --processes    # bench/results/cpu_ssl_step_profile.log
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
DATA = REPO.parent / "shared" / "data"


def clipkit_views(method: str):
    """``view_fn(bytes, key) -> uint8 (2, 3, 32, 32)``: the views of ``method``'s recipe."""
    from clipkit.data.views import make_views, view_spec
    from clipkit.train.ssl_task import DEFAULTS

    spec = view_spec(DEFAULTS[method][1])
    return lambda data, key: make_views(data, 32, spec, seed=0, epoch=0, key=key)


def clipkit_side(method: str, batch: int, steps: int):
    """``(step_fn(views_uint8) -> {phase: seconds}, view_fn(bytes, key) -> views)``."""
    from clipkit.config import load_config
    from clipkit.losses import build_loss
    from clipkit.train.optim import build_optimizer
    from clipkit.train.task import get_task

    cfg = load_config(
        REPO / "configs" / f"{method}_cifar10.yaml",
        [f"train.batch_size={batch}", f"optim.lr={0.06 * batch / 128}", "train.precision=fp32"],
    )
    task = get_task(cfg.task)
    model = task.build_model(cfg)
    loss_fn = build_loss(cfg.loss)
    opt = build_optimizer([model, loss_fn], cfg.optim)
    for m in (model, *task.extra_modules().values()):
        m.train()
    done = [0]

    def step(views: torch.Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        e = task.embed(model, {"views": views})
        loss = loss_fn(e.q, e.k, logit_scale=None, **({"extra": e.extra} if e.extra else {}))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.after_step(model, done[0] + 1, steps)
        done[0] += 1
        t3 = time.perf_counter()
        return {"forward+loss": t1 - t0, "backward": t2 - t1, "optimiser+after": t3 - t2}

    return step, clipkit_views(method)


def lightly_side(method: str, batch: int, steps: int):
    """As :func:`clipkit_side`, lightly's recipe (its transform returns normalised floats)."""
    from _lightly_ssl_runner import build
    from PIL import Image

    torch.manual_seed(0)
    transform, modules, step_fn = build(method, steps)
    params = [q for m in modules for q in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.06 * batch / 128, momentum=0.9, weight_decay=5e-4)
    for m in modules:
        m.train()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    done = [0]

    def step(views: torch.Tensor) -> dict[str, float]:
        # lightly's loader hands over float views already normalised (done in its workers).
        x = [(v.float() / 255 - mean) / std for v in views]  # (B, 3, S, S) each
        t0 = time.perf_counter()
        loss = step_fn(x, done[0])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        done[0] += 1
        t3 = time.perf_counter()
        return {"forward+loss": t1 - t0, "backward": t2 - t1, "optimiser+after": t3 - t2}

    def views(data: bytes, key: str):
        return transform(Image.open(io.BytesIO(data)).convert("RGB"))

    return step, views


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="simclr,moco")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps per side (after 1 warm-up)")
    p.add_argument("--images", type=int, default=400, help="images for the views' CPU cost")
    p.add_argument("--train", type=Path, default=DATA / "cifar10" / "train.tar")
    p.add_argument("--only", choices=("clipkit", "lightly"), help="one side in this process")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="steps inside clipkit.train.allocator.keep_freed_memory (the trainer's default)",
    )
    p.add_argument(
        "--processes",
        action="store_true",
        help="each side in its own process, with glibc's defaults and with freed memory kept",
    )
    args = p.parse_args(argv)
    if args.processes:
        return _each_in_its_process(args, argv or sys.argv[1:])

    from clipkit.data.sources import image_bytes, open_source

    items = (open_source(str(args.train)).items or [])[: max(args.images, args.batch)]
    blobs = [(image_bytes(r.image), f"img{i}") for i, r in enumerate(items)]
    for method in args.methods.split(","):
        print(f"== {method}: batch {args.batch}, {torch.get_num_threads()} threads", flush=True)
        build = {"clipkit": clipkit_side, "lightly": lightly_side}
        names = [args.only] if args.only else list(build)
        sides = {n: build[n](method, args.batch, args.steps + 1) for n in names}

        # Views: thread CPU per image, one thread (a loader worker's budget).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cpu = {name: 0.0 for name in sides}
        for data, key in blobs[: args.images]:
            for name, (_, view_fn) in sides.items():
                t = time.thread_time()
                view_fn(data, key)
                cpu[name] += time.thread_time() - t
        torch.set_num_threads(threads)
        ms = {k: 1e3 * v / args.images for k, v in cpu.items()}
        print("views CPU per image: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))

        # Steps: the same uint8 views for both sides, alternating, first step a warm-up.
        from clipkit.train.allocator import keep_freed_memory

        view_fn = clipkit_views(method)
        v = torch.stack([view_fn(d, k) for d, k in blobs[: args.batch]], 1)  # (2, B, 3, S, S)
        times: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        with keep_freed_memory(args.keep_freed_memory) as tuned:
            print(f"  keep freed memory: {tuned}")
            for i in range(args.steps + 1):
                order = list(sides) if i % 2 == 0 else list(sides)[::-1]
                for name in order:
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t = sides[name][0](v)
                    # Pages the step touched for the first time (the allocator went back to the OS).
                    t["page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                    if i:
                        times[name].append(t)
        med = {
            name: {ph: statistics.median(t[ph] for t in rows) for ph in rows[0]}
            for name, rows in times.items()
        }
        faults = {n: med[n].pop("page_faults") for n in med}
        for ph in med[names[0]]:
            row = "  ".join(f"{n} {med[n][ph] * 1e3:8.1f} ms" for n in names)
            ratio = f"  {med['clipkit'][ph] / med['lightly'][ph]:.3f}x" if len(names) == 2 else ""
            print(f"  {ph:16s} {row}{ratio}")
        total = {n: sum(med[n].values()) for n in names}
        print("  step             " + "  ".join(f"{n} {total[n] * 1e3:8.1f} ms" for n in names))
        print("  page faults/step " + "  ".join(f"{n} {faults[n]:9.0f}" for n in names))
        if len(names) == 2:
            print(
                f"{method}: step clipkit / lightly {total['clipkit'] / total['lightly']:.3f}x; "
                f"views CPU {ms['clipkit']:.3f} vs {ms['lightly']:.3f} ms/image",
                flush=True,
            )
    return 0


def _each_in_its_process(args: argparse.Namespace, argv: list[str]) -> int:
    """Run each side alone in a fresh process (as each trains), with glibc's allocator
    defaults and with freed memory kept; print the step time and page faults of each."""
    import re
    import subprocess

    base = [a for a in argv if a != "--processes"]
    res: dict[tuple[str, str, bool], tuple[float, float]] = {}
    for method in args.methods.split(","):
        for keep in (False, True):
            for side in ("clipkit", "lightly") if not keep else ("lightly", "clipkit"):
                cmd = [sys.executable, __file__, *base, "--methods", method, "--only", side]
                cmd += ["--keep-freed-memory"] if keep else []
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                print(f"--- {side}, keep freed memory {keep}\n{out.strip()}", flush=True)
                step = float(re.search(r"step +\w+ +([\d.]+) ms", out).group(1))
                faults = float(re.search(r"page faults/step +\w+ +([\d.]+)", out).group(1))
                res[method, side, keep] = step, faults
        print(f"== {method}: ms per step (page faults per step), each side in its own process")
        for keep in (False, True):
            c, lt = res[method, "clipkit", keep], res[method, "lightly", keep]
            print(
                f"  {'kept freed memory' if keep else 'glibc defaults   '}  clipkit {c[0]:7.1f} "
                f"({c[1]:7.0f})  lightly {lt[0]:7.1f} ({lt[1]:7.0f})  clipkit/lightly time "
                f"{c[0] / lt[0]:.3f}x"
            )
        c0, c1 = res[method, "clipkit", False][0], res[method, "clipkit", True][0]
        l0 = res[method, "lightly", False][0]
        print(
            f"{method}: clipkit (trainer default, freed memory kept) vs lightly as it runs: "
            f"{l0 / c1:.3f}x speed; clipkit kept vs glibc defaults {c0 / c1:.3f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
