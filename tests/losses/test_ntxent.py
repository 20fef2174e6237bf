"""nt_xent against lightly 1.6's NTXentLoss (float64, values and gradients within 1e-10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipkit.config import LossConfig
from clipkit.losses import NTXentLoss, build_loss, nt_xent, nt_xent_sharded

# lightly is the anchor but not a dev dependency (its hydra-core pin would downgrade omegaconf):
# .ci/run installs it with --no-deps; `pip install --no-deps lightly==1.6.0` does it by hand.
lightly_loss = pytest.importorskip("lightly.loss", reason="pip install --no-deps lightly==1.6.0")

TOL = 1e-10  # issue 13's acceptance; measured ~1e-15 (float64 rounding)


def _views(n: int, d: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    # Not normalised: both sides normalise inside, so the normalisation's backward is checked too.
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    z2 = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    return z1, z2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's size, absolute below 1 (a loss of 0 at N = 1)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _check(out, ref, inputs) -> None:
    assert out.dtype == ref.dtype
    assert _rel(out, ref) <= TOL, f"value {out.item()} vs {ref.item()}"
    for go, gr in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        assert _rel(go, gr) <= TOL, f"gradient rel err {_rel(go, gr):.3e}"


@pytest.mark.parametrize(
    "n,chunk",
    [(1, 0), (2, 1), (7, 1), (7, 3), (7, 0), (33, 5), (33, 16), (33, 66), (100, 37), (100, 0)],
)
@pytest.mark.parametrize("d", [3, 32])
@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_matches_lightly_float64(n, chunk, d, temperature):
    # chunks below N, not dividing 2N, equal to 2N, and the default (one tile)
    z1, z2 = _views(n, d, seed=n * d)
    ref = lightly_loss.NTXentLoss(temperature)(z1, z2)
    _check(nt_xent(z1, z2, temperature, chunk_size=chunk), ref, (z1, z2))


@pytest.mark.parametrize("chunk", [2, 0])
def test_is_symmetric_in_the_views(chunk):
    z1, z2 = _views(20, 6, seed=1)
    a, b = nt_xent(z1, z2, 0.3, chunk_size=chunk), nt_xent(z2, z1, 0.3, chunk_size=chunk)
    assert _rel(a, b) <= TOL


def test_temperature_tensor_gets_the_full_matrix_gradient():
    z1, z2 = _views(9, 4, seed=2)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = nt_xent(z1, z2, t, chunk_size=4)
    # Naive reference: the 2N x 2N matrix, self-similarity masked, positives at i +- N.
    t_ref = t.detach().clone().requires_grad_()
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = (z @ z.T / t_ref).masked_fill(torch.eye(18, dtype=torch.bool), float("-inf"))
    ref = F.cross_entropy(logits, torch.cat([torch.arange(9, 18), torch.arange(9)]))
    assert _rel(out, ref) <= TOL
    grads = torch.autograd.grad(out, (z1, z2, t))
    for g, g_ref in zip(grads, torch.autograd.grad(ref, (z1, z2, t_ref))):
        assert _rel(g, g_ref) <= TOL


@pytest.mark.parametrize("sizes", [[6], [5, 7], [3, 3, 4]])
def test_sharded_ranks_sum_to_the_global_loss(sizes):
    """W ranks simulated in one process: the sharded values and gradients add up to one batch.

    Exercises the general kernel's self-exclusion (rank offsets) without process groups; the
    gloo run is in test_distributed.py.
    """
    n, w = sum(sizes), len(sizes)
    z1, z2 = _views(n, 5, seed=3)
    u1, u2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    starts = [sum(sizes[:r]) for r in range(w)]
    blocks = [torch.cat([u1[s : s + m], u2[s : s + m]]) for s, m in zip(starts, sizes)]
    z_all = torch.cat(blocks)  # (2N, D) every rank's [z1; z2] block in rank order
    scale = torch.tensor(1 / 0.2, dtype=torch.float64)
    total = sum(
        nt_xent_sharded(u1[s : s + m], u2[s : s + m], scale, z_all=z_all, offset=2 * s,
                        n_global=n, world_size=w, chunk_size=4)
        for s, m in zip(starts, sizes)
    ) / w  # fmt: skip
    ref = lightly_loss.NTXentLoss(0.2)(z1, z2)
    _check(total, ref, (z1, z2))


def test_float32_and_bf16_inputs():
    z1, z2 = _views(50, 16, seed=4)
    ref = nt_xent(z1, z2, 0.5, chunk_size=8)
    out32 = nt_xent(z1.float(), z2.float(), 0.5, chunk_size=8)
    assert out32.dtype == torch.float32
    assert abs(out32.item() - ref.item()) <= 1e-5 * ref.item()
    out16 = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.5, chunk_size=8)
    assert out16.dtype == torch.float32  # tiles accumulate in float32
    assert abs(out16.item() - ref.item()) <= 2e-2 * ref.item()


def test_peak_tensor_is_a_tile_not_the_matrix(largest_output):
    n, d, chunk = 500, 8, 64
    z1, z2 = _views(n, d, seed=5, dtype=torch.float32)
    with largest_output() as mode:
        nt_xent(z1, z2, 0.5, chunk_size=chunk).backward()
    # Largest tensors: the (2N, D) views and a chunk x chunk tile; 2N x 2N would be 1e6.
    assert mode.largest <= max(2 * n * d, chunk * chunk)
    assert z1.grad is not None and z2.grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"chunk_size": -1}, "chunk_size must be >= 0"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, match):
    z1, z2 = _views(4, 3, seed=6)
    with pytest.raises(ValueError, match=match):
        nt_xent(z1, z2, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty"):
        nt_xent(torch.randn(0, 3), torch.randn(0, 3))


def test_module_from_the_registry():
    loss_fn = build_loss(LossConfig(name="nt_xent", temperature=0.5, chunk_size=3)).double()
    assert isinstance(loss_fn, NTXentLoss)
    z1, z2 = _views(10, 4, seed=7)
    # The model's own scale, given in float64, matches lightly; the module's own temperature
    # is its log-scale parameter (learnable by default) and matches the pure function.
    s = torch.tensor(2.0, dtype=torch.float64)
    _check(loss_fn(z1, z2, logit_scale=s), lightly_loss.NTXentLoss(0.5)(z1, z2), (z1, z2))
    own = loss_fn(z1, z2)
    own.backward()
    assert loss_fn.log_scale.grad is not None
    ref = nt_xent(z1, z2, 1 / loss_fn.logit_scale.detach(), chunk_size=3)
    assert _rel(own.detach(), ref.detach()) <= TOL
    with pytest.raises(ValueError, match="no hard negatives"):
        loss_fn(z1, z2, hard_negatives=z1)
    with pytest.raises(ValueError, match="queue_size applies"):
        build_loss(LossConfig(name="nt_xent", queue_size=8))
    with pytest.raises(ValueError, match="label_smoothing applies to infonce only"):
        build_loss(LossConfig(name="nt_xent", label_smoothing=0.1))
