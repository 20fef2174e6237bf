"""Worker for test_distributed.py: the loss modules on W gloo processes vs one global batch.

Run with ``torchrun --nproc_per_node 2 tests/losses/dist_loss_worker.py OUT.json``. Every rank
holds a slice of one fixed global batch (unequal slices: 5 and 7 rows); features come from
small linear "towers" so the check is on parameter gradients, averaged over ranks as DDP does.
The reference is the pure single-process function on the whole batch. Rank 0 writes the
largest relative error of every case.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipkit.config import LossConfig
from clipkit.losses import build_loss, info_nce, moco_v3_loss, siglip_loss
from clipkit.losses.moco import moco_rows
from clipkit.losses.ntxent import nt_xent_scaled

N, D_IN, D, H = 12, 10, 6, 2
SIZES = [5, 7]
DT = torch.float64


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "wq": torch.randn(D_IN, D, generator=g, dtype=DT).requires_grad_(),
        "wk": torch.randn(D_IN, D, generator=g, dtype=DT).requires_grad_(),
        "log_s": torch.tensor(math.log(14.3), dtype=DT).requires_grad_(),
        "bias": torch.tensor(-2.0, dtype=DT).requires_grad_(),
    }


def _data(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "xq": torch.randn(N, D_IN, generator=g, dtype=DT),
        "xk": torch.randn(N, D_IN, generator=g, dtype=DT),
        "xh": torch.randn(N, H, D_IN, generator=g, dtype=DT),
    }


def _ddp_grads(p: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Copies of ``p``'s gradients averaged over the ranks: what DDP does to a model's."""
    grads = {n: t.grad.clone() for n, t in p.items() if t.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    return grads


def _rank_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of ``x`` over the ranks (a detached copy)."""
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world


def _embed(p, x, rows):
    q = F.normalize(x["xq"][rows] @ p["wq"], dim=-1)  # (n, D)
    k = F.normalize(x["xk"][rows] @ p["wk"], dim=-1)  # (n, D)
    hn = F.normalize(x["xh"][rows].reshape(-1, D_IN) @ p["wk"], dim=-1)  # (n*H, D)
    return q, k, hn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


CASES = {
    # name: (loss config, use hard negatives, model passes its scale (and bias))
    "infonce": (LossConfig(), False, True),
    "infonce_hardneg_smooth": (LossConfig(label_smoothing=0.1), True, True),
    "simcse_hardneg_fixed_temp": (
        LossConfig(temperature=0.05, learnable_temperature=False, symmetric=False),
        True,
        False,
    ),
    "infonce_own_temperature": (LossConfig(), False, False),
    "siglip": (LossConfig(name="siglip"), False, True),
    "siglip_hardneg_own": (LossConfig(name="siglip"), True, False),
    # SimCLR: q and k are the two views; the module's own (learnable) temperature, or the model's
    "nt_xent_own_temperature": (LossConfig(name="nt_xent", temperature=0.5), False, False),
    "nt_xent": (LossConfig(name="nt_xent", temperature=0.5), False, True),
}


def _reference(cfg, loss_fn, q, k, hn, s, b, extra=None):
    if cfg.name == "nt_xent":
        return nt_xent_scaled(q, k, s, chunk_size=4)
    if cfg.name == "siglip":
        return siglip_loss(q, k, s, b, hard_negatives=hn, chunk_size=4, extra_negatives=extra)
    return info_nce(
        q,
        k,
        s,
        hard_negatives=hn,
        symmetric=cfg.symmetric,
        label_smoothing=cfg.label_smoothing,
        chunk_size=4,
        extra_negatives=extra,
    )


def run_case(name, rank, world) -> float:
    cfg, use_hn, model_scale = CASES[name]
    cfg.chunk_size = 3
    p, x = _params(0), _data(1)
    start = sum(SIZES[:rank])
    rows = torch.arange(start, start + SIZES[rank])
    # Distributed: this rank's slice through the module.
    loss_fn = build_loss(cfg).double()
    q, k, hn = _embed(p, x, rows)
    kw = {"hard_negatives": hn if use_hn else None}
    if model_scale:
        kw["logit_scale"] = p["log_s"].exp()
        kw["logit_bias"] = p["bias"] if cfg.name == "siglip" else None
    local = loss_fn(q, k, **kw)
    local.backward()
    grads = _ddp_grads(p, world)
    own = {n: t.grad.clone() for n, t in loss_fn.named_parameters() if t.grad is not None}
    mean_loss = _rank_mean(local, world)
    # Reference: one process, the global batch, the pure function.
    p_ref, ref_fn = _params(0), build_loss(cfg).double()
    q, k, hn = _embed(p_ref, x, torch.arange(N))
    s = p_ref["log_s"].exp() if model_scale else ref_fn.logit_scale
    b = p_ref["bias"] if model_scale else getattr(ref_fn, "bias", None)
    ref = _reference(cfg, ref_fn, q, k, hn if use_hn else None, s, b)
    ref.backward()
    errs = [_rel(mean_loss, ref.detach())]
    for n, t in p_ref.items():
        if t.grad is not None:
            errs.append(_rel(grads[n], t.grad))
    ref_own = {n: t.grad for n, t in ref_fn.named_parameters() if t.grad is not None}
    assert set(own) == set(ref_own), name
    for n, g in ref_own.items():  # own temperature/bias: averaged by the module itself
        errs.append(_rel(own[n], g))
    assert set(grads) == {n for n, t in p_ref.items() if t.grad is not None}, name
    return max(errs)


def run_queue_case(rank, world) -> float:
    cfg = LossConfig(queue_size=16, chunk_size=3)
    p, x1, x2 = _params(0), _data(1), _data(2)
    start = sum(SIZES[:rank])
    rows = torch.arange(start, start + SIZES[rank])
    loss_fn = build_loss(cfg).double()
    for x in (x1, x2):  # the second step sees the first step's global keys in the queue
        for t in p.values():
            t.grad = None
        q, k, _ = _embed(p, x, rows)
        local = loss_fn(q, k, logit_scale=p["log_s"].exp())
        local.backward()
    grads = _ddp_grads(p, world)
    p_ref = _params(0)
    with torch.no_grad():
        _, k1, _ = _embed(p_ref, x1, torch.arange(N))
    q, k, _ = _embed(p_ref, x2, torch.arange(N))
    info_nce(q, k, p_ref["log_s"].exp(), extra_negatives=k1, chunk_size=4).backward()
    return max(_rel(grads[n], p_ref[n].grad) for n in grads)


def run_moco_case(rank, world, own_scale: bool) -> dict[str, float]:
    """Three MoCo steps (the 24-key queue wraps): loss, gradients and the queue of every rank
    equal one process that holds the global batch and pushes its keys."""
    cfg = LossConfig(name="moco", temperature=0.2, queue_size=24, chunk_size=3)
    start = sum(SIZES[:rank])
    rows = torch.arange(start, start + SIZES[rank])
    p, p_ref = _params(0), _params(0)
    loss_fn, ref_fn = build_loss(cfg).double(), build_loss(cfg).double()
    errs = []
    for step, seed in enumerate((1, 2, 3)):
        x = _data(seed)
        for t in (*p.values(), *p_ref.values(), loss_fn.log_scale, ref_fn.log_scale):
            t.grad = None
        q, k, _ = _embed(p, x, rows)  # k carries a gradient: the loss must not assume otherwise
        local = loss_fn(q, k) if own_scale else loss_fn(q, k, logit_scale=p["log_s"].exp())
        local.backward()
        grads = _ddp_grads(p, world)
        mean_loss = _rank_mean(local, world)
        # Reference: the pure rows on the global batch; its queue pushed by hand.
        q, k, _ = _embed(p_ref, x, torch.arange(N))
        if step == 0:
            ref_fn._init_queue(k)
        s = ref_fn.logit_scale if own_scale else p_ref["log_s"].exp()
        ref = moco_rows(q, k, ref_fn.queue.get().clone(), s, chunk_size=4).mean()
        ref.backward()
        ref_fn.queue.push(F.normalize(k.detach(), dim=-1))
        errs.append(_rel(mean_loss, ref.detach()))
        assert set(grads) == {n for n, t in p_ref.items() if t.grad is not None}
        errs += [_rel(grads[n], p_ref[n].grad) for n in grads]
        if own_scale:
            errs.append(_rel(loss_fn.log_scale.grad, ref_fn.log_scale.grad))
    assert int(loss_fn.queue.ptr) == int(ref_fn.queue.ptr) == (3 * N) % 24
    queue_err = (loss_fn.queue.keys - ref_fn.queue.keys).abs().max().item()
    name = "moco_queue_own_temperature" if own_scale else "moco_queue"
    return {name: max(errs), name + "_content": queue_err}


def run_moco_direction_case(rank, world) -> float:
    """loss.moco_push=direction, three steps (the 48-key queue wraps): every rank's loss,
    gradients and queue equal one process holding the global batch (rows interleaved per
    image: view-1 query, view-2 query; the second view's rows come from the hard-negative
    inputs here, any second set of rows will do)."""
    cfg = LossConfig(name="moco", temperature=0.2, queue_size=48, chunk_size=3,
                     moco_push="direction")  # fmt: skip
    start = sum(SIZES[:rank])
    p, p_ref = _params(0), _params(0)
    loss_fn, ref_fn = build_loss(cfg).double(), build_loss(cfg).double()

    def pairs(params, x, rows):
        q, k, hn = _embed(params, x, rows)
        q2, k2 = hn[::H], F.normalize(hn[1::H] + k, dim=-1)  # (n, D) each
        return torch.stack([q, q2], 1).flatten(0, 1), torch.stack([k, k2], 1).flatten(0, 1)

    errs = []
    for seed in (1, 2, 3):
        x = _data(seed)
        for t in (*p.values(), *p_ref.values()):
            t.grad = None
        q, k = pairs(p, x, torch.arange(start, start + SIZES[rank]))  # (2n, D)
        local = loss_fn(q, k, logit_scale=p["log_s"].exp())
        local.backward()
        grads = _ddp_grads(p, world)
        mean_loss = _rank_mean(local, world)
        # Reference: the pure rows on the global batch, its queue pushed by hand (the module
        # itself would gather across the ranks here).
        q, k = pairs(p_ref, x, torch.arange(N))
        if seed == 1:
            ref_fn._init_queue(k)
        queue, s = ref_fn.queue, p_ref["log_s"].exp()
        first = F.normalize(k[0::2].detach(), dim=-1)  # (N, D) view-1 rows' keys
        r1 = moco_rows(q[0::2], k[0::2], queue.get().clone(), s, chunk_size=4)
        r2 = moco_rows(q[1::2], k[1::2], queue.pushed(first), s, chunk_size=4)
        ref = torch.cat([r1, r2]).mean()
        queue.push(first)
        queue.push(F.normalize(k[1::2].detach(), dim=-1))
        ref.backward()
        errs.append(_rel(mean_loss, ref.detach()))
        errs += [_rel(grads[n], p_ref[n].grad) for n in grads]
    errs.append((loss_fn.queue.keys - ref_fn.queue.keys).abs().max().item())
    return max(errs)


def run_moco_v3_case(rank, world) -> float:
    """MoCo v3: each rank holds its images' two views interleaved by row (as the task does)."""
    cfg = LossConfig(name="moco_v3", temperature=0.5, learnable_temperature=False, chunk_size=3)
    p, x = _params(0), _data(1)
    start = sum(SIZES[:rank])
    rows = torch.arange(start, start + SIZES[rank])

    def views(p, rows):
        x1, x2 = x["xq"][rows], x["xk"][rows]  # (n, D_IN): two views of the same images
        q1, q2 = (F.normalize(v @ p["wq"], dim=-1) for v in (x1, x2))  # student
        k1, k2 = (F.normalize(v @ p["wk"], dim=-1) for v in (x1, x2))  # teacher
        return q1, q2, k1, k2

    q1, q2, k1, k2 = views(p, rows)
    loss_fn = build_loss(cfg).double()
    # The fixed scale passed in float64: the module's own buffer holds log(1/T) in float32.
    scale = torch.tensor(1 / 0.5, dtype=DT)
    local = loss_fn(
        torch.stack([q1, q2], 1).flatten(0, 1),  # (2n, D) interleaved
        torch.stack([k1, k2], 1).flatten(0, 1),
        logit_scale=scale,
    )
    local.backward()
    grads = _ddp_grads(p, world)
    mean_loss = _rank_mean(local, world)
    p_ref = _params(0)
    ref = moco_v3_loss(*views(p_ref, torch.arange(N)), 0.5, chunk_size=4)
    ref.backward()
    errs = [_rel(mean_loss, ref.detach())]
    errs += [_rel(grads[n], t.grad) for n, t in p_ref.items() if t.grad is not None]
    assert set(grads) == {n for n, t in p_ref.items() if t.grad is not None}
    return max(errs)


def run_slip_case(rank, world, clip_name: str) -> float:
    """SLIP: the CLIP loss (model's scale) + 0.7 x NT-Xent (T 0.1) on two views, each rank
    holding its rows of image, caption and both views; loss and gradients of every tower
    (averaged as DDP does) equal infonce / siglip + 0.7 x nt_xent on the global batch."""
    from clipkit.losses import nt_xent
    from clipkit.losses.slip import VIEW_KEYS

    cfg = LossConfig(name=clip_name, ssl_weight=0.7, ssl_temperature=0.1, chunk_size=3)
    start = sum(SIZES[:rank])
    rows = torch.arange(start, start + SIZES[rank])

    def views(p, rows):
        # Two views of the same images through their own "trunk + head" (wk, wq): (n, D) each.
        return F.normalize(x["xh"][rows, 0] @ p["wk"], dim=-1), F.normalize(
            x["xh"][rows, 1] @ p["wq"], dim=-1
        )

    p, x = _params(0), _data(1)
    q, k, _ = _embed(p, x, rows)
    loss_fn = build_loss(cfg).double()
    bias = p["bias"] if clip_name == "siglip" else None
    local = loss_fn(
        q,
        k,
        logit_scale=p["log_s"].exp(),
        logit_bias=bias,
        extra=dict(zip(VIEW_KEYS, views(p, rows))),
    )
    local.backward()
    grads = _ddp_grads(p, world)
    mean_loss = _rank_mean(local, world)
    p_ref = _params(0)
    q, k, _ = _embed(p_ref, x, torch.arange(N))
    s = p_ref["log_s"].exp()
    b = p_ref["bias"] if clip_name == "siglip" else None
    ref = _reference(cfg, None, q, k, None, s, b) + 0.7 * nt_xent(
        *views(p_ref, torch.arange(N)), temperature=0.1, chunk_size=4
    )
    ref.backward()
    assert set(grads) == {n for n, t in p_ref.items() if t.grad is not None}
    errs = [_rel(mean_loss, ref.detach())]
    errs += [_rel(grads[n], t.grad) for n, t in p_ref.items() if t.grad is not None]
    return max(errs)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {name: run_case(name, rank, world) for name in CASES}
    results["infonce_queue"] = run_queue_case(rank, world)
    results.update(run_moco_case(rank, world, own_scale=False))
    results.update(run_moco_case(rank, world, own_scale=True))
    results["moco_v3"] = run_moco_v3_case(rank, world)
    results["moco_direction"] = run_moco_direction_case(rank, world)
    results["slip"] = run_slip_case(rank, world, "infonce")
    results["slip_siglip"] = run_slip_case(rank, world, "siglip")
    gathered: list[dict[str, float]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        worst = {n: max(r[n] for r in gathered) for n in results}
        with open(out, "w") as f:
            json.dump(worst, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
