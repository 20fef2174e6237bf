"""SLIPLoss = the CLIP loss + ssl_weight x NT-Xent, exactly; built by build_loss; bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipkit.config import LossConfig
from clipkit.losses import build_loss, info_nce, nt_xent, siglip_loss
from clipkit.losses.slip import VIEW_KEYS, SLIPLoss

DT = torch.float64


def _inputs(n: int, d: int, p: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: F.normalize(torch.randn(n, dim, generator=g, dtype=DT), dim=-1).requires_grad_()
        for name, dim in (("q", d), ("k", d), ("z1", p), ("z2", p))
    }


@pytest.mark.parametrize("n, d, p", [(1, 4, 3), (7, 8, 5), (33, 16, 12)])
@pytest.mark.parametrize("weight, temperature", [(1.0, 0.1), (0.25, 0.5)])
@pytest.mark.parametrize("clip_name", ["infonce", "siglip"])
def test_equals_clip_plus_weighted_nt_xent(n, d, p, weight, temperature, clip_name):
    """Value and every input's gradient equal the pure functions' (float64, <= 1e-12)."""
    cfg = LossConfig(name=clip_name, ssl_weight=weight, ssl_temperature=temperature, chunk_size=4)
    loss_fn = build_loss(cfg).double()
    assert isinstance(loss_fn, SLIPLoss)
    x = _inputs(n, d, p)
    scale = torch.tensor(14.3, dtype=DT, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=DT, requires_grad=True) if clip_name == "siglip" else None
    got = loss_fn(
        x["q"], x["k"], logit_scale=scale, logit_bias=bias,
        extra={VIEW_KEYS[0]: x["z1"], VIEW_KEYS[1]: x["z2"]},
    )  # fmt: skip
    leaves = [*x.values(), scale] + ([bias] if bias is not None else [])
    g_got = torch.autograd.grad(got, leaves)
    if clip_name == "siglip":
        clip = siglip_loss(x["q"], x["k"], scale, bias)
    else:
        clip = info_nce(x["q"], x["k"], scale)
    ssl = nt_xent(x["z1"], x["z2"], temperature=temperature)
    want = clip + weight * ssl
    g_want = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # The two parts are kept for logging, before the weighting.
    torch.testing.assert_close(loss_fn.parts["loss_clip"], clip.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss_fn.parts["loss_ssl"], ssl.detach(), rtol=1e-12, atol=0)


def test_views_are_symmetric():
    """Swapping the two views leaves the loss unchanged (NT-Xent is symmetric in its views)."""
    loss_fn = build_loss(LossConfig(ssl_weight=1.0)).double()
    x = _inputs(9, 6, 5)
    s = torch.tensor(10.0, dtype=DT)
    a = loss_fn(x["q"], x["k"], logit_scale=s, extra={"ssl_1": x["z1"], "ssl_2": x["z2"]})
    b = loss_fn(x["q"], x["k"], logit_scale=s, extra={"ssl_1": x["z2"], "ssl_2": x["z1"]})
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_ssl_temperature_is_fixed_and_clamp_leaves_it():
    """Only the CLIP part's scale is a parameter, and clamp_ caps it, never NT-Xent's."""
    loss_fn = build_loss(LossConfig(ssl_weight=1.0, ssl_temperature=0.005, max_logit_scale=100))
    names = [n for n, _ in loss_fn.named_parameters()]
    assert names == ["clip_loss.log_scale"]
    with torch.no_grad():
        loss_fn.clip_loss.log_scale.fill_(math.log(500.0))
    loss_fn.clamp_()
    assert loss_fn.clip_loss.logit_scale.item() == pytest.approx(100.0)
    assert loss_fn.temperature == 0.005  # 1/T = 200 > the cap, used as set


def test_plain_clip_is_unchanged():
    assert not isinstance(build_loss(LossConfig()), SLIPLoss)
    assert not isinstance(build_loss(LossConfig(ssl_weight=0.0)), SLIPLoss)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (LossConfig(ssl_weight=-1.0), "loss.ssl_weight must be >= 0"),
        (LossConfig(ssl_weight=float("nan")), "loss.ssl_weight must be >= 0"),
        (LossConfig(name="nt_xent", ssl_weight=1.0), "infonce or siglip, not to loss.name=nt_xent"),
        (LossConfig(ssl_weight=1.0, ssl_temperature=0.0), "loss.ssl_temperature must be > 0"),
    ],
)
def test_bad_settings_are_one_line_errors(cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        build_loss(cfg)
    assert "\n" not in str(err.value)


def test_missing_views_name_the_task():
    loss_fn = build_loss(LossConfig(ssl_weight=1.0))
    x = _inputs(4, 6, 5)
    with pytest.raises(ValueError, match="only task=clip provides them"):
        loss_fn(x["q"], x["k"])
    with pytest.raises(ValueError, match="3 view rows for 4 images"):
        loss_fn(x["q"], x["k"], extra={"ssl_1": x["z1"][:3], "ssl_2": x["z2"][:3]})
