"""Worker for test_distributed_ssl.py: Barlow Twins, BYOL and SwAV on W gloo processes.

Run with ``torchrun --nproc_per_node 2 tests/losses/dist_ssl_worker.py OUT.json``. Every rank
holds a slice of one fixed global batch (unequal slices: 5 and 7 images); the loss inputs come
from small linear "towers" (and SwAV prototypes) so the check is on parameter gradients,
averaged over ranks as DDP does. The reference is the pure function on the whole batch in one
process. Rank 0 writes the largest relative error of every case (values and gradients).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipkit.config import LossConfig
from clipkit.losses import barlow_twins_loss, build_loss, negative_cosine, swav_loss

N, D_IN, D, K, V_LO, Q = 12, 10, 6, 9, 3, 4
SIZES = [5, 7]
DT = torch.float64


def _params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(D_IN, D, generator=g, dtype=DT).requires_grad_(),
        "w2": torch.randn(D_IN, D, generator=g, dtype=DT).requires_grad_(),
        "protos": torch.randn(K, D, generator=g, dtype=DT).requires_grad_(),
    }


def _data(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(N, D_IN, generator=g, dtype=DT)
    return {
        "x1": x1,
        "x2": x1 + 0.5 * torch.randn(N, D_IN, generator=g, dtype=DT),  # a correlated view
        "low": torch.randn(N, V_LO, D_IN, generator=g, dtype=DT),  # small crops, rows first
        # Each rank's own queue of past features (SwAV's per-process queue): Q rows per rank.
        "queue": torch.randn(len(SIZES), 2, Q, D_IN, generator=g, dtype=DT),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _scores(p, x: torch.Tensor) -> torch.Tensor:
    """SwAV: cosine of unit features and unit prototypes, (..., K)."""
    return F.normalize(x @ p["w1"], dim=-1) @ F.normalize(p["protos"], dim=-1).T


def _inputs(name, p, x, rows, rank):
    """(q, k, extra, queue scores) of ``rows`` for the module, as the tasks hand them over."""
    if name == "barlow_twins":  # raw projections of the two views
        return x["x1"][rows] @ p["w1"], x["x2"][rows] @ p["w2"], None, None
    if name == "byol":  # predictions vs targets; k keeps its gradient (the loss must not drop it)
        return x["x1"][rows] @ p["w1"], x["x2"][rows] @ p["w2"], None, None
    low = _scores(p, x["low"][rows])  # (n, V_lo, K)
    with torch.no_grad():  # the task scores its queue with the current prototypes
        queue = _scores(p, x["queue"][rank])  # (2, Q, K)
    return _scores(p, x["x1"][rows]), _scores(p, x["x2"][rows]), {"low_res": low}, queue


def _reference(name, p, x, use_queue):
    every = torch.arange(N)
    q, k, extra, _ = _inputs(name, p, x, every, 0)
    if name == "barlow_twins":
        return barlow_twins_loss(q, k, 0.01)
    if name == "byol":
        return negative_cosine(q, k)
    queue = None
    if use_queue:  # one process: every rank's queue rows join the Sinkhorn rows of their crop
        with torch.no_grad():
            queue = _scores(p, x["queue"].transpose(0, 1).flatten(1, 2))  # (2, W * Q, K)
    low = extra["low_res"].transpose(0, 1)  # (V_lo, N, K)
    return swav_loss([q, k], low, queue=queue, temperature=0.1, epsilon=0.05, iterations=3)


CASES = {
    "barlow_twins": LossConfig(name="barlow_twins", barlow_lambda=0.01),
    "byol": LossConfig(name="byol"),
    "swav": LossConfig(name="swav", temperature=0.1, learnable_temperature=False),
    "swav_queue": LossConfig(name="swav", temperature=0.1, learnable_temperature=False),
}


def run_case(case: str, rank: int, world: int) -> dict[str, float]:
    cfg = CASES[case]
    name, use_queue = cfg.name, case.endswith("_queue")
    p, x = _params(0), _data(1)
    start = sum(SIZES[:rank])
    rows = torch.arange(start, start + SIZES[rank])
    loss_fn = build_loss(cfg)
    q, k, extra, queue = _inputs(name, p, x, rows, rank)
    if use_queue:  # a step-wide input (Embeddings.shared), handed over in extra as the loop does
        extra = {**extra, "queue": torch.stack(list(queue))}  # (2, Q, K)
    local = loss_fn(q, k, **({"extra": extra} if extra else {}))
    local.backward()
    grads = {n: t.grad.clone() for n, t in p.items() if t.grad is not None}
    for g in grads.values():  # what DDP does to the model's parameters
        dist.all_reduce(g)
        g /= world
    mean_loss = local.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    p_ref = _params(0)
    ref = _reference(name, p_ref, x, use_queue)
    ref.backward()
    assert set(grads) == {n for n, t in p_ref.items() if t.grad is not None}, case
    out = {
        case + "/value": _rel(mean_loss, ref.detach()),
        case + "/grad": max(_rel(grads[n], p_ref[n].grad) for n in grads),
    }
    if name == "barlow_twins":  # not row-separable: every rank returns the global loss itself
        out[case + "/value_every_rank"] = _rel(local.detach(), ref.detach())
    return out


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == len(SIZES), f"run with --nproc_per_node {len(SIZES)}"
    torch.set_num_threads(1)
    results: dict[str, float] = {}
    for case in CASES:
        results.update(run_case(case, rank, world))
    gathered: list[dict[str, float]] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        worst = {n: max(r[n] for r in gathered) for n in results}
        with open(out, "w") as f:
            json.dump(worst, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
