"""lightly 1.6's side of ``bench/ssl_train.py``: its CIFAR-10 recipe of each method, plain loop.

One run per process (fresh, as clipkit's trainer is). What comes from lightly: the view
transforms (``SimCLRTransform``, ``MoCoV2Transform``, ``BYOLTransform``, ``SwaVTransform``),
the projection / prediction heads and SwAV's prototypes, the losses (``NTXentLoss`` with its
memory bank for MoCo, ``NegativeCosineSimilarity``, ``BarlowTwinsLoss``, ``SwaVLoss``),
``update_momentum``, ``batch_shuffle`` / ``batch_unshuffle`` and ``cosine_schedule``. The
training step follows lightly's CIFAR-10 benchmark
(docs/source/getting_started/benchmarks/cifar10_benchmark.py): SimCLR is NT-Xent over the two
views; MoCo is symmetrised as two loss calls (queries of view 0 against keys of view 1, then the
reverse), averaged, the momentum update before the forward passes; BYOL is the negative cosine
of each view's prediction with the momentum projection of the other, averaged, the momentum
update first; Barlow Twins is ``BarlowTwinsLoss`` of the two views' projections; SwAV
normalises the prototypes, then scores the two crops' L2-normalised projections and calls
``SwaVLoss(high_resolution, low_resolution=[])``. What is ours: the backbone
(torchvision's ResNet-18 with the CIFAR stem, built exactly as ``clipkit.models.ssl`` builds it,
so both sides train the same module), reading the CIFAR-10 ImageFolder tar through clipkit's
input layer (``clipkit.data.sources``: records with tar offsets, decoded with PIL here), and
the timing log.

    python bench/_lightly_ssl_runner.py --method simclr --train ../shared/data/cifar10/train.tar \
        --steps 3 --batch 32 --lr 0.015 --out /tmp/lightly_simclr

Writes ``<out>/metrics.jsonl`` (``{"step", "loss", "lr", "samples_per_s", "data_wait_frac"}`` every
``--log-every`` steps: samples over the wall time since the previous log line, data waits
included, as clipkit's ``train/samples_per_s``), ``<out>/backbone.pt`` (the backbone's state
dict) for the kNN evaluation, and ``<out>/backbone_step<N>.pt`` after each step N of
``--save-steps`` (the kNN-over-steps curve; saved after that step's log line, so the save falls
in the next interval, as clipkit's in-training evaluation does).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn


def resnet18_cifar() -> nn.Module:
    """torchvision ResNet-18, 3x3 stride-1 stem, no max-pool, no classifier: ``(B, 512)``."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class TarImages(torch.utils.data.Dataset):
    """The images of an ImageFolder tar, each through ``transform`` (lightly's: 2 views)."""

    def __init__(self, spec: str, transform) -> None:
        from clipkit.data.sources import open_source

        self.items = open_source(spec).items or []
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from clipkit.data.sources import image_bytes

        rec = self.items[i]
        img = Image.open(io.BytesIO(image_bytes(rec.image))).convert("RGB")
        return self.transform(img), rec.label


METHODS = ("simclr", "moco", "byol", "barlow_twins", "swav")


def build(method: str, steps: int, swav_freeze: int = 0, moco_push: str = "each"):
    """``(transform, student modules, step function)`` of lightly's CIFAR-10 recipe.

    The step function takes the batch's list of views ``[(B, 3, 32, 32), ...]`` and the step.
    ``moco_push``: ``each`` (lightly's benchmark: each of the two loss calls pushes its keys
    into the memory bank, so the second direction's negatives hold the first direction's keys
    of this step, each image's own same-view key among them) or ``once`` (both directions score
    against the bank as it was before the step, and both key sets are pushed after, as the MoCo
    authors' symmetrised CIFAR-10 demo and clipkit do): a diagnostic of the difference.
    """
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import (
        batch_shuffle,
        batch_unshuffle,
        deactivate_requires_grad,
        update_momentum,
    )
    from lightly.transforms import MoCoV2Transform, SimCLRTransform
    from lightly.utils.scheduler import cosine_schedule
    from torch.nn import functional as F

    backbone = resnet18_cifar()
    if method in ("byol", "barlow_twins", "swav"):
        return _build_no_negatives(method, backbone, steps, swav_freeze)
    if method == "simclr":
        # cj_strength 0.5 -> jitter (0.4, 0.4, 0.4, 0.1); no blur at 32 px (lightly's CIFAR-10).
        transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
        head = SimCLRProjectionHead(512, 512, 128)
        criterion = NTXentLoss(temperature=0.5)

        def step(views: list[torch.Tensor], i: int) -> torch.Tensor:
            return criterion(head(backbone(views[0])), head(backbone(views[1])))

        return transform, (backbone, head), step

    # MoCo v2: crop (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, gray 0.2, PIL blur p 0.5.
    transform = MoCoV2Transform(input_size=32)
    head = MoCoProjectionHead(512, 512, 128)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))

    def pair(xq: torch.Tensor, xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = head(backbone(xq))  # (B, 128)
        with torch.no_grad():
            xk, shuffle = batch_shuffle(xk)
            k = batch_unshuffle(head_m(backbone_m(xk)), shuffle)  # (B, 128)
        return q, k

    def moco_step(views: list[torch.Tensor], i: int) -> torch.Tensor:
        x0, x1 = views
        m = cosine_schedule(i, steps, 0.99, 1.0)
        update_momentum(backbone, backbone_m, m)
        update_momentum(head, head_m, m)
        if moco_push == "each":
            return 0.5 * (criterion(*pair(x0, x1)) + criterion(*pair(x1, x0)))
        mb = criterion.memory_bank
        bank, ptr = mb.bank.clone(), mb.bank_ptr.clone()
        q0, k1 = pair(x0, x1)
        first = criterion(q0, k1)  # pushes k1 ...
        mb.bank.copy_(bank)  # ... undone: the second call sees the bank before the step
        mb.bank_ptr.copy_(ptr)
        second = criterion(*pair(x1, x0))  # pushes k0
        with torch.no_grad():
            mb._dequeue_and_enqueue(F.normalize(k1, dim=1))  # then k1, as one push
        return 0.5 * (first + second)

    return transform, (backbone, head), moco_step


def _build_no_negatives(method: str, backbone: nn.Module, steps: int, swav_freeze: int):
    """BYOL, Barlow Twins and SwAV as :func:`build` returns them."""
    import torch.nn.functional as F
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    # BYOL's asymmetric views (blur p 1.0 / 0.1, solarisation p 0 / 0.2, jitter 0.4/0.4/0.2/0.1),
    # what clipkit's byol recipe draws with ssl.blur_kernel=0 (PIL's radius blur, sigma in px;
    # the recipe's own kernel is 10% of the side); Barlow Twins uses them too.
    byol_views = BYOLTransform(BYOLView1Transform(input_size=32), BYOLView2Transform(input_size=32))
    if method == "byol":
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        head = BYOLProjectionHead(512, 1024, 256)
        predictor = BYOLPredictionHead(256, 1024, 256)
        backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
        deactivate_requires_grad(backbone_m)
        deactivate_requires_grad(head_m)
        criterion = NegativeCosineSimilarity()

        def byol_step(views: list[torch.Tensor], i: int) -> torch.Tensor:
            m = cosine_schedule(i, steps, 0.99, 1.0)
            update_momentum(backbone, backbone_m, m)
            update_momentum(head, head_m, m)
            p0, p1 = (predictor(head(backbone(x))) for x in views)  # (B, 256) each
            with torch.no_grad():
                z0, z1 = (head_m(backbone_m(x)) for x in views)  # (B, 256) each
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

        return byol_views, (backbone, head, predictor), byol_step

    if method == "barlow_twins":
        from lightly.loss import BarlowTwinsLoss
        from lightly.models.modules import BarlowTwinsProjectionHead

        head = BarlowTwinsProjectionHead(512, 2048, 2048)
        criterion = BarlowTwinsLoss(lambda_param=5e-3)

        def bt_step(views: list[torch.Tensor], i: int) -> torch.Tensor:
            return criterion(head(backbone(views[0])), head(backbone(views[1])))

        return byol_views, (backbone, head), bt_step

    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.transforms import SwaVTransform

    # 2 crops at 32 px, scale 0.14-1, colour distortion s 1.0 (0.8/0.8/0.8/0.2) p 0.8, gray
    # 0.2, blur p 0.5 (PIL radius): clipkit's swav recipe with ssl.blur_kernel=0 (lightly's
    # benchmark file turns the blur off).
    transform = SwaVTransform(
        crop_sizes=(32,), crop_counts=(2,), crop_min_scales=(0.14,), crop_max_scales=(1.0,)
    )
    head = SwaVProjectionHead(512, 512, 128)
    prototypes = SwaVPrototypes(128, 512, n_steps_frozen_prototypes=swav_freeze)
    criterion = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)

    def swav_step(views: list[torch.Tensor], i: int) -> torch.Tensor:
        prototypes.normalize()
        scores = [prototypes(F.normalize(head(backbone(x)), dim=1), i) for x in views]
        return criterion(scores[:2], scores[2:])  # (B, 512) each; no small crops

    return transform, (backbone, head, prototypes), swav_step


def run_loop(args: argparse.Namespace, data, modules, step_fn) -> int:
    """SGD (lightly's CIFAR-10 settings) over ``data`` for ``args.steps`` steps, timed and
    logged as clipkit's trainer logs; ``step_fn(inputs, labels, step)`` returns the loss."""
    params = [q for m in modules for q in m.parameters()]
    # lightly's CIFAR-10 benchmark: weight decay on every parameter; cosine over the run.
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    for m in modules:
        m.train()
    save_steps = {int(x) for x in args.save_steps.split(",") if x.strip()}
    log = (args.out / "metrics.jsonl").open("w")
    step, last_logged, wait = 0, 0, 0.0
    batches = iter(loader)
    t_last = time.perf_counter()
    while step < args.steps:
        t0 = time.perf_counter()
        try:
            inputs, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        wait += time.perf_counter() - t0
        loss = step_fn(inputs, labels, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            row = {
                "step": step,
                "loss": float(loss.detach()),
                "lr": sched.get_last_lr()[0],
                "samples_per_s": args.batch * (step - last_logged) / max(now - t_last, 1e-9),
                "data_wait_frac": wait / max(now - t_last, 1e-9),
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
            t_last, last_logged, wait = now, step, 0.0
            if not math.isfinite(row["loss"]):
                raise SystemExit(f"non-finite loss at step {step}")
        if step in save_steps and step < args.steps:
            torch.save(modules[0].state_dict(), args.out / f"backbone_step{step}.pt")
    log.close()
    torch.save(modules[0].state_dict(), args.out / "backbone.pt")
    return 0


def common_args(p: argparse.ArgumentParser) -> None:
    """The options every runner of ``bench/ssl_train.py`` shares."""
    p.add_argument("--train", required=True, help="CIFAR-10 ImageFolder tar")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--lr", type=float, required=True, help="0.06 x batch / 128 in the recipe")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--save-steps", default="", help="comma-separated steps to save the backbone")
    p.add_argument("--out", type=Path, required=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--swav-freeze", type=int, default=0, help="SwAV: steps with frozen prototypes")
    p.add_argument("--moco-push", choices=("each", "once"), default="each", help="see build()")
    common_args(p)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    transform, modules, step_fn = build(args.method, args.steps, args.swav_freeze, args.moco_push)
    data = TarImages(args.train, transform)
    return run_loop(args, data, modules, lambda views, _labels, i: step_fn(views, i))


if __name__ == "__main__":
    raise SystemExit(main())
