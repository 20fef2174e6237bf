"""swav_loss / sinkhorn_codes against lightly 1.6's SwaVLoss and sinkhorn (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipkit.config import LossConfig
from clipkit.losses import SwAVLoss, build_loss, sinkhorn_codes, swav_loss

# Installed by .ci/run with --no-deps (see test_ntxent.py).
lightly_loss = pytest.importorskip("lightly.loss", reason="pip install --no-deps lightly==1.6.0")
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn  # noqa: E402

TOL = 1e-10  # issue 14's acceptance


def _scores(v: int, n: int, k: int, g: torch.Generator) -> list[torch.Tensor]:
    """``v`` crops' prototype scores: cosines of unit features and unit prototypes, as SwAV."""
    protos = F.normalize(torch.randn(k, 16, generator=g, dtype=torch.float64), dim=1)
    feats = [
        F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1) for _ in range(v)
    ]
    return [(f @ protos.T).requires_grad_() for f in feats]  # (n, K) each


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's size, absolute below 1 (zero gradients too)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _check(out, ref, inputs) -> None:
    assert out.shape == () and out.dtype == torch.float64
    ref = ref.reshape(())  # lightly returns shape (1,)
    assert _rel(out, ref) <= TOL, f"value {out.item()} vs {ref.item()}"
    # A lone high-resolution crop predicts nothing: no gradient on either side (zeros).
    go = torch.autograd.grad(out, inputs, materialize_grads=True)
    gr = torch.autograd.grad(ref, inputs, materialize_grads=True)
    for a, b in zip(go, gr):
        assert _rel(a, b) <= TOL, f"gradient rel err {_rel(a, b):.3e}"


@pytest.mark.parametrize(
    "v_hi,v_lo,n,k,queue",
    [(2, 0, 8, 30, 0), (2, 6, 16, 50, 0), (1, 3, 5, 7, 0), (3, 2, 9, 11, 20), (2, 4, 32, 100, 64)],
)
@pytest.mark.parametrize(
    "temperature,epsilon,iterations", [(0.1, 0.05, 3), (0.2, 0.1, 1), (0.5, 0.03, 6)]
)
def test_matches_lightly_float64(v_hi, v_lo, n, k, queue, temperature, epsilon, iterations):
    g = torch.Generator().manual_seed(v_hi * 1000 + n * k + queue)
    high, low = _scores(v_hi, n, k, g), _scores(v_lo, n, k, g)
    qu = [s.detach() for s in _scores(v_hi, queue, k, g)] if queue else None
    ref = lightly_loss.SwaVLoss(temperature, iterations, epsilon)(high, low, qu)
    out = swav_loss(
        high, low, queue=qu, temperature=temperature, epsilon=epsilon, iterations=iterations
    )
    _check(out, ref, high + low)


@pytest.mark.parametrize("b,k,iterations", [(8, 30, 3), (64, 10, 1), (5, 200, 5)])
def test_codes_equal_lightlys_sinkhorn(b, k, iterations):
    g = torch.Generator().manual_seed(b + k)
    (s,) = _scores(1, b, k, g)
    codes = sinkhorn_codes(s, 0.05, iterations)
    assert not codes.requires_grad
    ref = lightly_sinkhorn(s.detach(), iterations, 0.05)
    assert ((codes - ref).abs().max() / ref.abs().max()).item() <= 1e-12
    assert torch.allclose(codes.sum(1), torch.ones(b, dtype=torch.float64), atol=1e-14)


def test_stacked_and_listed_crops_agree_and_large_scores_stay_finite():
    g = torch.Generator().manual_seed(1)
    high, low = _scores(2, 6, 9, g), _scores(3, 6, 9, g)
    a = swav_loss(high, low)
    b = swav_loss(torch.stack(high), torch.stack(low))
    assert a.item() == b.item()
    # exp(score / 0.05) overflows float32 from a score of ~4.4: the global max is subtracted.
    big = [(s.detach() * 50).float() for s in high]
    assert torch.isfinite(swav_loss(big, [s.detach().float() * 50 for s in low]))


def test_float32_and_bf16_inputs():
    g = torch.Generator().manual_seed(2)
    high, low = _scores(2, 32, 40, g), _scores(4, 32, 40, g)
    ref = swav_loss(high, low).item()
    out32 = swav_loss([s.float() for s in high], [s.float() for s in low])
    assert out32.dtype == torch.float32 and abs(out32.item() - ref) <= 1e-5 * ref
    out16 = swav_loss([s.bfloat16() for s in high], [s.bfloat16() for s in low])
    assert out16.dtype == torch.float32 and abs(out16.item() - ref) <= 2e-2 * ref


@pytest.mark.parametrize(
    "high,low,kwargs,match",
    [
        ([torch.randn(4, 5)], None, {}, "at least 2 crops"),
        ([], [torch.randn(4, 5)] * 2, {}, "at least one high-resolution crop"),
        ([torch.randn(4, 5)] * 2, [torch.randn(3, 5)], {}, r"low-resolution crop 0 has scores"),
        ([torch.randn(4, 5), torch.randn(4, 6)], None, {}, "high-resolution crop 1 has"),
        ([torch.randn(4, 5)] * 2, None, {"queue": [torch.randn(3, 5)]}, "one score set per"),
        ([torch.randn(4, 5)] * 2, None, {"queue": [torch.randn(3, 4)] * 2}, "queue 0 has"),
        (torch.randn(2, 4, 5, 1), None, {}, r"must be \(V, N, K\)"),
        ([torch.randn(4, 5)] * 2, None, {"temperature": 0.0}, "temperature must be > 0"),
        ([torch.randn(4, 5)] * 2, None, {"epsilon": -1.0}, "epsilon must be > 0"),
        ([torch.randn(4, 5)] * 2, None, {"iterations": 0}, "iterations must be an int >= 1"),
    ],
)
def test_bad_input_is_one_line(high, low, kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        swav_loss(high, low, **kwargs)
    assert "\n" not in str(err.value)


def _module(**overrides) -> SwAVLoss:
    cfg = dict(name="swav", temperature=0.1, learnable_temperature=False)
    return build_loss(LossConfig(**{**cfg, **overrides}))


def test_module_takes_rows_first_small_crops_and_matches_lightly():
    loss_fn = _module(sinkhorn_epsilon=0.04, sinkhorn_iterations=4)
    assert isinstance(loss_fn, SwAVLoss) and not list(loss_fn.parameters())
    g = torch.Generator().manual_seed(3)
    (s1, s2), low = _scores(2, 10, 20, g), _scores(4, 10, 20, g)
    low_rows = torch.stack(low, 1)  # (n, V_lo, K) as the task hands it over
    ref = lightly_loss.SwaVLoss(0.1, 4, 0.04)([s1, s2], low)
    _check(loss_fn(s1, s2, extra={"low_res": low_rows}), ref, [s1, s2, *low])
    ref = lightly_loss.SwaVLoss(0.1, 4, 0.04)([s1, s2], [])
    _check(loss_fn(s1, s2), ref, [s1, s2])


def test_module_queue_input_joins_the_sinkhorn_rows():
    loss_fn = _module()
    g = torch.Generator().manual_seed(4)
    (s1, s2), queue = _scores(2, 6, 15, g), _scores(2, 24, 15, g)
    ref = lightly_loss.SwaVLoss()([s1, s2], [], [q.detach() for q in queue])
    _check(loss_fn(s1, s2, extra={"queue": torch.stack(queue)}), ref, [s1, s2])  # (2, Q, K)
    _check(loss_fn(s1, s2), lightly_loss.SwaVLoss()([s1, s2], []), [s1, s2])  # not kept


def test_module_and_config_errors():
    loss_fn = _module()
    s = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"low_res'\] must be \(n, V_lo, K\) with n=4"):
        loss_fn(s, s, extra={"low_res": torch.randn(3, 2, 5)})
    with pytest.raises(ValueError, match=r"unknown extra inputs \['crops'\]; valid: low_res"):
        loss_fn(s, s, extra={"crops": s})
    with pytest.raises(ValueError, match=r"queue'\] must be \(2, Q, K=5\)"):
        loss_fn(s, s, extra={"queue": s})
    with pytest.raises(ValueError, match="takes no logit_scale"):
        loss_fn(s, s, logit_scale=torch.tensor(10.0))
    with pytest.raises(ValueError, match="fixed temperature"):
        build_loss(LossConfig(name="swav", temperature=0.1))  # learnable_temperature defaults on
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        _module(sinkhorn_epsilon=0.0)
    with pytest.raises(ValueError, match="iterations must be an int >= 1"):
        _module(sinkhorn_iterations=0)
    with pytest.raises(ValueError, match="queue_size applies"):
        _module(queue_size=64)
