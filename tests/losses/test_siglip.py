"""siglip_loss against open_clip's SigLipLoss and a naive full-matrix reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from clipkit.losses import siglip_loss


def _unit(n: int, d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()


def _t(v: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype, requires_grad=True)


def _naive(q, k, s, b, hn=None):
    keys = k if hn is None else torch.cat([k, hn])
    logits = s * q @ keys.T + b  # (N, M)
    z = -torch.ones_like(logits)
    z[:, : q.shape[0]] += 2 * torch.eye(q.shape[0], dtype=z.dtype)
    return -F.logsigmoid(z * logits).sum() / q.shape[0]


def _check(out, ref, inputs, rtol):
    torch.testing.assert_close(out, ref, rtol=rtol, atol=0)
    for go, gr in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(go, gr, rtol=rtol, atol=rtol * gr.abs().max().item())


@pytest.mark.parametrize("n", [1, 9, 50])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0), (100.0, -3.0)])
@pytest.mark.parametrize("chunk", [8, None])
def test_matches_open_clip_float64(n, scale, bias, chunk):
    q, k, s, b = _unit(n, 16, seed=1), _unit(n, 16, seed=2), _t(scale), _t(bias)
    ref = SigLipLoss()(q, k, s, b)
    _check(siglip_loss(q, k, s, b, chunk_size=chunk), ref, (q, k, s, b), 1e-12)


def test_matches_open_clip_float32():
    q, k = _unit(130, 32, torch.float32, 3), _unit(130, 32, torch.float32, 4)
    s, b = _t(10.0, torch.float32), _t(-10.0, torch.float32)
    ref = SigLipLoss()(q, k, s, b)
    _check(siglip_loss(q, k, s, b, chunk_size=32), ref, (q, k, s, b), 1e-5)


def test_hard_and_extra_negatives_match_naive():
    q, k, hn = _unit(20, 8, seed=5), _unit(20, 8, seed=6), _unit(40, 8, seed=7)
    s, b = _t(10.0), _t(-10.0)
    _check(siglip_loss(q, k, s, b, hard_negatives=hn, chunk_size=7), _naive(q, k, s, b, hn),
           (q, k, s, b, hn), 1e-12)  # fmt: skip
    extra = _unit(11, 8, seed=8)
    out = siglip_loss(q, k, s, b, extra_negatives=extra, chunk_size=7)
    _check(out, _naive(q, k, s, b, extra.detach()), (q, k, s, b), 1e-12)


def test_positive_term_is_exact_when_loss_is_tiny():
    # Perfectly aligned pairs at scale 100: positives contribute softplus(-100) ~ 4e-44;
    # summing softplus(L) and subtracting L would lose it entirely.
    q = _unit(4, 4, seed=9)
    with torch.no_grad():
        q.copy_(torch.eye(4, dtype=q.dtype))
    s, b = _t(100.0), _t(0.0)
    out = siglip_loss(q, q, s, b, chunk_size=2)
    ref = _naive(q, q, s, b)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


def test_errors():
    q = _unit(4, 3)
    with pytest.raises(ValueError, match="logit_bias"):
        siglip_loss(q, q, 1.0, torch.zeros(3))
    with pytest.raises(ValueError, match="hard_negatives"):
        siglip_loss(q, q, 1.0, 0.0, hard_negatives=torch.zeros(2, 5))
