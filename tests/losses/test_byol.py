"""BYOL's negative_cosine against lightly 1.6's NegativeCosineSimilarity (float64)."""

from __future__ import annotations

import pytest
import torch

from clipkit.config import LossConfig
from clipkit.losses import BYOLLoss, build_loss, negative_cosine

# Installed by .ci/run with --no-deps (see test_ntxent.py).
lightly_loss = pytest.importorskip("lightly.loss", reason="pip install --no-deps lightly==1.6.0")

TOL = 1e-10  # issue 14's acceptance


def _rows(n: int, d: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's size, absolute below 1."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _check(out, ref, inputs) -> None:
    assert out.shape == () and out.dtype == ref.dtype
    assert _rel(out, ref) <= TOL, f"value {out.item()} vs {ref.item()}"
    for go, gr in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        assert _rel(go, gr) <= TOL, f"gradient rel err {_rel(go, gr):.3e}"


@pytest.mark.parametrize("n", [1, 5, 64])
@pytest.mark.parametrize("d", [1, 3, 128])
def test_matches_lightly_float64(n, d):
    g = torch.Generator().manual_seed(n * 1000 + d)
    p, z = _rows(n, d, g), _rows(n, d, g)
    _check(negative_cosine(p, z), lightly_loss.NegativeCosineSimilarity()(p, z), (p, z))


def test_tiny_rows_take_the_same_eps():
    # cosine_similarity clamps the norms' product at eps = 1e-8: a near-zero row as lightly.
    g = torch.Generator().manual_seed(1)
    p, z = _rows(4, 3, g), _rows(4, 3, g)
    with torch.no_grad():
        p[0] *= 1e-9
    _check(negative_cosine(p, z), lightly_loss.NegativeCosineSimilarity()(p, z), (p, z))


def test_symmetrised_rows_are_lightlys_byol_example():
    """The task's q = cat(p1, p2), k = cat(z2, z1) is lightly's 0.5 (L(p1, z2) + L(p2, z1))."""
    g = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = (_rows(9, 16, g) for _ in range(4))
    crit = lightly_loss.NegativeCosineSimilarity()
    ref = 0.5 * (crit(p1, z2.detach()) + crit(p2, z1.detach()))
    out = negative_cosine(torch.cat([p1, p2]), torch.cat([z2, z1]).detach())
    _check(out, ref, (p1, p2))


def test_float32_and_bf16_inputs():
    g = torch.Generator().manual_seed(3)
    p, z = _rows(50, 32, g), _rows(50, 32, g)
    ref = negative_cosine(p, z).item()
    assert negative_cosine(p.float(), z.float()).dtype == torch.float32
    assert abs(negative_cosine(p.float(), z.float()).item() - ref) <= 1e-6
    out16 = negative_cosine(p.bfloat16(), z.bfloat16())
    assert out16.dtype == torch.float32 and abs(out16.item() - ref) <= 1e-2


def test_bad_shapes_are_one_line():
    for p, z, match in [
        (torch.randn(4, 3), torch.randn(5, 3), "one shape"),
        (torch.randn(4, 3), torch.randn(4, 2), "one shape"),
        (torch.randn(0, 3), torch.randn(0, 3), "empty"),
        (torch.randn(3), torch.randn(3), "2-D"),
    ]:
        with pytest.raises(ValueError, match=match) as err:
            negative_cosine(p, z)
        assert "\n" not in str(err.value)


def test_module_from_the_registry():
    loss_fn = build_loss(LossConfig(name="byol"))
    assert isinstance(loss_fn, BYOLLoss) and not list(loss_fn.parameters())
    g = torch.Generator().manual_seed(4)
    p, z = _rows(12, 8, g), _rows(12, 8, g)
    _check(loss_fn(p, z), lightly_loss.NegativeCosineSimilarity()(p, z), (p, z))
    with pytest.raises(ValueError, match="takes no hard negatives"):
        loss_fn(p, z, hard_negatives=z)
    with pytest.raises(ValueError, match="takes no logit_bias"):
        loss_fn(p, z, logit_bias=torch.tensor(0.0))
    with pytest.raises(ValueError, match="queue_size applies"):
        build_loss(LossConfig(name="byol", queue_size=8))
