"""Exact gradient accumulation for contrastive losses (GradCache, Gao et al. 2021).

Plain accumulation sums the losses of independent micro-batches, so each example only sees its
own micro-batch's negatives. GradCache instead (1) embeds every micro-batch without autograd,
(2) computes the loss over the whole accumulated batch and its gradient w.r.t. the embeddings,
(3) re-runs each micro-batch with autograd and back-propagates the cached embedding gradients.
The result is the gradient of one big batch with the activation memory of one micro-batch.
Dropout masks match between (1) and (3) because the RNG state is replayed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch


class RandState:
    """Snapshot of the CPU and current-device CUDA RNG, restorable later."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if self.cuda else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


Embedded = dict[str, Any]
# Shared by all micro-batches (not concatenated): their gradient is pushed once per step.
SCALARS = ("logit_scale", "logit_bias")
SHARED = "shared/"  # prefix of a task's other step-wide inputs (any shape), treated the same


def _shared(name: str) -> bool:
    return name in SCALARS or name.startswith(SHARED)


def widen(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 embeddings are widened; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _surrogate(out: Embedded, grads: Embedded) -> torch.Tensor:
    """sum(<output, cached grad>) whose backward pushes the cached grads into the towers."""
    total = torch.zeros((), device=out["q"].device, dtype=widen(out["q"]).dtype)
    # Every cached gradient has a counterpart in the replayed output (same keys each call).
    for name, g in grads.items():
        if g is None or out.get(name) is None:
            continue
        total = total + (widen(out[name]) * g).sum()
    return total


def gradcache_step(
    micro_batches: list[dict[str, Any]],
    embed: Callable[[dict[str, Any]], Embedded],
    loss_fn: Callable[[Embedded], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """Run one exact accumulated step; returns the (detached) loss of the full batch.

    Args:
        micro_batches: the step's micro-batches.
        embed: micro-batch -> ``{"q" (b, D), "k" (b, D), ["hard_negatives" (b*h, D)],
            ["logit_scale" ()], ["logit_bias" ()], ["shared/<name>" any shape],
            [any other name: (b', ...)]}`` from the (wrapped) model's forward. The scalars and
            ``shared/`` inputs are the step's (taken from the first micro-batch, gradient pushed
            once); every other tensor is concatenated over micro-batches along its first
            dimension (so a task's extra row tensors, e.g. ``"extra/view1"``, take the same
            exact path as ``q`` and ``k``).
        loss_fn: concatenated embeddings -> scalar loss (handles distributed gather itself).
        backward: ``accelerator.backward``.
        no_sync: context manager suppressing DDP's gradient all-reduce (all but the last replay).
    """
    # (1) embed every micro-batch without autograd, remembering each RNG state.
    states, cached = [], []
    with torch.no_grad():
        for mb in micro_batches:
            states.append(RandState())
            cached.append(embed(mb))
    # (2) loss on the full batch; gradients w.r.t. the embeddings (and the scale/bias leaves).
    names = [n for n, t in cached[0].items() if not _shared(n) and t is not None]
    shared = [n for n, t in cached[0].items() if _shared(n) and t is not None]
    leaves = {n: widen(torch.cat([c[n] for c in cached])).detach().requires_grad_() for n in names}
    for n in shared:
        t = widen(cached[0][n]).detach()
        # Floating inputs become leaves (a gradient, if the loss gives one, is pushed once).
        leaves[n] = t.requires_grad_() if t.is_floating_point() else t
    loss = loss_fn(leaves)
    diff = {n: t for n, t in leaves.items() if t.requires_grad}
    grads = torch.autograd.grad(loss, list(diff.values()), allow_unused=True)
    gmap = dict(zip(diff.keys(), grads))
    # (3) replay each micro-batch with autograd and push the cached gradients through it.
    offsets = {n: 0 for n in names}
    last = len(micro_batches) - 1
    for i, (mb, st) in enumerate(zip(micro_batches, states)):
        ctx = no_sync() if i < last else contextlib.nullcontext()
        with ctx, st.replay():
            out = embed(mb)
            piece: Embedded = {}
            for n in names:
                size = out[n].shape[0]
                g = gmap[n]
                piece[n] = None if g is None else g[offsets[n] : offsets[n] + size]
                offsets[n] += size
            # The scale/bias are shared by all micro-batches: push their gradient once, and a
            # zero elsewhere so every replay uses every parameter (DDP insists on that when a
            # wrapper syncs each backward, e.g. a 1-process DDP).
            for n in shared:
                if gmap.get(n) is not None:
                    piece[n] = gmap[n] if i == last else torch.zeros_like(gmap[n])
            backward(_surrogate(out, piece))
    return loss.detach()
