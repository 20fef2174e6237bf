"""info_nce against open_clip's ClipLoss, F.cross_entropy and sentence-transformers' MNRL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clipkit.losses import info_nce


def _unit(n: int, d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()


def _scale(value: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def _naive(q, k, s, hn=None, symmetric=True, eps=0.0):
    """Full-matrix reference: keys = [k; hn], reverse direction over the positives only."""
    keys = k if hn is None else torch.cat([k, hn])
    logits = s * q @ keys.T  # (N, M)
    labels = torch.arange(q.shape[0])
    rows = F.cross_entropy(logits, labels, label_smoothing=eps)
    if not symmetric:
        return rows
    cols = F.cross_entropy(logits[:, : q.shape[0]].T, labels, label_smoothing=eps)
    return 0.5 * (rows + cols)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def _assert_rel(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    err = (a - b).abs().max().item()
    assert err <= rtol * max(b.abs().max().item(), 1e-30), f"max abs err {err:.3e}"


@pytest.mark.parametrize("n", [1, 7, 64, 100])
@pytest.mark.parametrize("d", [3, 32])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("chunk", [16, None])
def test_matches_open_clip_float64(n, d, scale, chunk):
    q, k, s = _unit(n, d, seed=1), _unit(n, d, seed=2), _scale(scale)
    ref = ClipLoss()(q, k, s)
    out = info_nce(q, k, s, chunk_size=chunk)
    assert out.dtype == torch.float64
    _assert_rel(out, ref, 1e-12)
    for go, gr in zip(_grads(out, (q, k, s)), _grads(ref, (q, k, s))):
        _assert_rel(go, gr, 1e-12)


@pytest.mark.parametrize("n,chunk", [(130, 32), (300, None), (50, 7)])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_matches_open_clip_float32(n, chunk, scale):
    q, k = _unit(n, 64, torch.float32, 3), _unit(n, 64, torch.float32, 4)
    s = _scale(scale, torch.float32)
    ref = ClipLoss()(q, k, s)
    out = info_nce(q, k, s, chunk_size=chunk)
    _assert_rel(out, ref, 1e-5)
    for go, gr in zip(_grads(out, (q, k, s)), _grads(ref, (q, k, s))):
        _assert_rel(go, gr, 1e-5)


def test_symmetric_in_q_and_k():
    q, k, s = _unit(40, 8, seed=5), _unit(40, 8, seed=6), _scale(20.0)
    torch.testing.assert_close(info_nce(q, k, s, chunk_size=9), info_nce(k, q, s, chunk_size=9))
    # One-directional is not symmetric in general.
    a = info_nce(q, k, s, symmetric=False)
    b = info_nce(k, q, s, symmetric=False)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("h", [0, 2])
def test_label_smoothing_and_hard_negatives_match_cross_entropy(eps, symmetric, h):
    n = 37
    q, k, s = _unit(n, 16, seed=7), _unit(n, 16, seed=8), _scale(14.3)
    hn = _unit(n * h, 16, seed=9) if h else None
    ref = _naive(q, k, s, hn, symmetric, eps)
    out = info_nce(
        q, k, s, hard_negatives=hn, symmetric=symmetric, label_smoothing=eps, chunk_size=10
    )
    _assert_rel(out, ref, 1e-12)
    inputs = (q, k, s) if hn is None else (q, k, s, hn)
    for go, gr in zip(_grads(out, inputs), _grads(ref, inputs)):
        _assert_rel(go, gr, 1e-12)


def test_hard_negatives_match_mnrl():
    from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
        MultipleNegativesRankingLoss,
    )

    n, h = 24, 2
    q, k, hn = _unit(n, 16, seed=10), _unit(n, 16, seed=11), _unit(n * h, 16, seed=12)
    from sentence_transformers.util import dot_score

    # Dot product on unit vectors = cosine, without cos_sim's renormalisation in the gradient.
    mnrl = MultipleNegativesRankingLoss(None, scale=20.0, similarity_fct=dot_score)
    ref = mnrl.compute_loss_from_embeddings([q, k, hn[:n], hn[n:]], None)
    out = info_nce(q, k, torch.tensor(20.0, dtype=torch.float64), hard_negatives=hn,
                   symmetric=False, chunk_size=5)  # fmt: skip
    _assert_rel(out, ref, 1e-12)
    for go, gr in zip(_grads(out, (q, k, hn)), _grads(ref, (q, k, hn))):
        _assert_rel(go, gr, 1e-12)


def test_extra_negatives_are_constant_columns():
    q, k, s = _unit(20, 8, seed=13), _unit(20, 8, seed=14), _scale(10.0)
    extra = _unit(9, 8, seed=15)
    ref = _naive(q, k, s, extra.detach())
    out = info_nce(q, k, s, extra_negatives=extra, chunk_size=6)
    _assert_rel(out, ref, 1e-12)
    out.backward()
    assert extra.grad is None and q.grad is not None


def test_bf16_inputs_accumulate_in_float32_tiny_loss():
    # Near-duplicate pairs at scale 100: the loss is ~1e-20, so a positive logit rounded
    # differently from the tile logits would dominate it (ANCHORS.md pitfall).
    n, d = 64, 32
    base = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(16)), dim=-1)
    q = base.to(torch.bfloat16).requires_grad_()
    k = base.to(torch.bfloat16).requires_grad_()
    s = _scale(100.0, torch.float32)
    out = info_nce(q, k, s, chunk_size=16)
    assert out.dtype == torch.float32
    ref = _naive(q.detach().double(), k.detach().double(), s.detach().double())
    assert abs(out.item() - ref.item()) <= 1e-3 * ref.item() + 1e-30
    gq, gk = _grads(out, (q, k))
    assert gq.dtype == torch.bfloat16 and gk.dtype == torch.bfloat16


def test_python_float_scale_and_errors():
    q, k = _unit(8, 4), _unit(8, 4, seed=1)
    torch.testing.assert_close(info_nce(q, k, 5.0), info_nce(q, k, torch.tensor(5.0)).double())
    with pytest.raises(ValueError, match="one shape"):
        info_nce(q, k[:7], 1.0)
    with pytest.raises(ValueError, match="hard_negatives"):
        info_nce(q, k, 1.0, hard_negatives=torch.zeros(8, 5))
    with pytest.raises(ValueError, match="label_smoothing"):
        info_nce(q, k, 1.0, label_smoothing=1.0)
    with pytest.raises(ValueError, match="scalar"):
        info_nce(q, k, torch.ones(2))


def test_torch_compile_does_not_unroll_tiles():
    q, k, s = _unit(50, 8), _unit(50, 8, seed=1), _scale(14.3)

    def fn(q, k, s):
        return info_nce(q * 1.0, k, s, chunk_size=5)  # 100 tiles if it were traced

    explain = torch._dynamo.explain(fn)(q, k, s)
    # The loss is skipped (a break before it), not traced: only ``q * 1.0`` is in the graph.
    assert any("disable" in r.reason for r in explain.break_reasons)
    assert sum(len(g.graph.nodes) for g in explain.graphs) < 10
    torch._dynamo.reset()
    out = torch.compile(fn, backend="eager")(q, k, s)
    _assert_rel(out, ClipLoss()(q, k, s), 1e-12)
