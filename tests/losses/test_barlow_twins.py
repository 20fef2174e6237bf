"""barlow_twins_loss against lightly 1.6's BarlowTwinsLoss (float64, values and gradients)."""

from __future__ import annotations

import pytest
import torch

from clipkit.config import LossConfig
from clipkit.losses import BarlowTwinsLoss, barlow_twins_loss, build_loss

# Installed by .ci/run with --no-deps (see test_ntxent.py).
lightly_loss = pytest.importorskip("lightly.loss", reason="pip install --no-deps lightly==1.6.0")

TOL = 1e-10  # issue 14's acceptance


def _views(n: int, d: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated views with per-dimension offsets and scales (the standardisation matters)."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(d, generator=g, dtype=dtype) * 3
    scale = torch.rand(d, generator=g, dtype=dtype) * 4 + 0.1
    z1 = torch.randn(n, d, generator=g, dtype=dtype) * scale + shift
    z2 = 0.7 * z1 + torch.randn(n, d, generator=g, dtype=dtype)
    return z1.requires_grad_(), z2.requires_grad_()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's size, absolute below 1."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _check(out, ref, inputs) -> None:
    assert out.shape == () and out.dtype == ref.dtype
    assert _rel(out, ref) <= TOL, f"value {out.item()} vs {ref.item()}"
    for go, gr in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        assert _rel(go, gr) <= TOL, f"gradient rel err {_rel(go, gr):.3e}"


@pytest.mark.parametrize("n", [2, 3, 16, 65])
@pytest.mark.parametrize("d", [1, 8, 64])
@pytest.mark.parametrize("lambd", [0.0, 5e-3, 0.1, 1.0])
def test_matches_lightly_float64(n, d, lambd):
    z1, z2 = _views(n, d, seed=n * 100 + d)
    ref = lightly_loss.BarlowTwinsLoss(lambda_param=lambd)(z1, z2)
    _check(barlow_twins_loss(z1, z2, lambd), ref, (z1, z2))


def test_is_symmetric_in_the_views():
    z1, z2 = _views(20, 6, seed=1)
    assert _rel(barlow_twins_loss(z1, z2), barlow_twins_loss(z2, z1)) <= TOL


def test_identical_decorrelated_views_give_almost_zero():
    # Whitened identical views: C = I up to the batch-norm eps, so the loss is ~0.
    g = torch.Generator().manual_seed(2)
    z = torch.linalg.qr(torch.randn(64, 8, generator=g, dtype=torch.float64))[0]
    z = (z - z.mean(0)) * 8  # orthogonal, centred columns of variance ~1
    assert barlow_twins_loss(z, z).item() < 1e-4


def test_float32_and_bf16_inputs():
    z1, z2 = _views(50, 16, seed=3)
    ref = barlow_twins_loss(z1, z2)
    out32 = barlow_twins_loss(z1.float(), z2.float())
    assert out32.dtype == torch.float32
    assert abs(out32.item() - ref.item()) <= 1e-5 * ref.item()
    out16 = barlow_twins_loss(z1.bfloat16(), z2.bfloat16())
    assert out16.dtype == torch.float32  # widened: the statistics accumulate in float32
    assert abs(out16.item() - ref.item()) <= 5e-2 * ref.item()


def test_nothing_larger_than_the_batch_or_d_by_d(largest_output):
    n, d = 400, 12
    z1, z2 = _views(n, d, seed=4, dtype=torch.float32)
    with largest_output() as mode:
        barlow_twins_loss(z1, z2).backward()
    assert mode.largest <= max(n * d, d * d)  # N x N would be 1.6e5


@pytest.mark.parametrize(
    "z1,z2,kwargs,match",
    [
        (torch.randn(1, 4), torch.randn(1, 4), {}, "N >= 2 rows"),
        (torch.randn(4, 3), torch.randn(5, 3), {}, "one shape"),
        (torch.randn(4), torch.randn(4), {}, "must be 2-D"),
        (torch.randn(4, 3), torch.randn(4, 3), {"lambd": -1.0}, "lambda must be finite"),
        (torch.randn(4, 3), torch.randn(4, 3), {"lambd": float("nan")}, "lambda must be finite"),
    ],
)
def test_bad_input_is_one_line(z1, z2, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        barlow_twins_loss(z1, z2, **kwargs)
    assert "\n" not in str(err.value)


def test_module_from_the_registry():
    loss_fn = build_loss(LossConfig(name="barlow_twins", barlow_lambda=0.02))
    assert isinstance(loss_fn, BarlowTwinsLoss) and not list(loss_fn.parameters())
    z1, z2 = _views(10, 5, seed=5)
    _check(loss_fn(z1, z2), lightly_loss.BarlowTwinsLoss(lambda_param=0.02)(z1, z2), (z1, z2))
    loss_fn.clamp_()  # the loop calls it on every loss: nothing to clamp
    for kw, match in [
        ({"hard_negatives": z1}, "takes no hard negatives"),
        ({"logit_scale": torch.tensor(2.0)}, "takes no logit_scale"),
        ({"extra": {"low_res": z1}}, r"unknown extra inputs \['low_res'\]; valid: none"),
    ]:
        with pytest.raises(ValueError, match=match):
            loss_fn(z1, z2, **kw)
    with pytest.raises(ValueError, match="queue_size applies"):
        build_loss(LossConfig(name="barlow_twins", queue_size=8))
    with pytest.raises(ValueError, match="barlow_lambda must be"):
        build_loss(LossConfig(name="barlow_twins", barlow_lambda=-0.1))
