"""ContrastiveLoss modules: registry, temperature handling, clamp, queue (single process)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from clipkit.config import LossConfig
from clipkit.losses import InfoNCELoss, NegativeQueue, SigLIPLoss, build_loss, info_nce


def _unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_registry_builds_by_name_and_lists_valid_names():
    assert isinstance(build_loss(LossConfig()), InfoNCELoss)
    assert isinstance(build_loss(LossConfig(name="siglip")), SigLIPLoss)
    valid = "barlow_twins, byol, infonce, moco, moco_v3, nt_xent, siglip, swav"
    with pytest.raises(ValueError, match=f"valid: {valid}"):
        build_loss(LossConfig(name="ntxent"))
    with pytest.raises(ValueError, match="temperature"):
        build_loss(LossConfig(temperature=0.0))
    with pytest.raises(ValueError, match="max_logit_scale"):
        build_loss(LossConfig(temperature=0.005))  # scale 200 > 100 would be clamped
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss(LossConfig(name="siglip", label_smoothing=0.1))


def test_own_learnable_temperature_trains_and_matches_clip_loss():
    loss_fn = build_loss(LossConfig()).double()
    assert math.isclose(loss_fn.logit_scale.item(), 1 / 0.07, rel_tol=1e-6)  # float32 init
    q, k = _unit(16).requires_grad_(), _unit(16, seed=1)
    loss = loss_fn(q, k)
    ref = ClipLoss()(q, k, loss_fn.logit_scale.detach())
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    loss.backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.log_scale.grad.abs() > 0


def test_fixed_temperature_simcse_is_a_buffer():
    cfg = LossConfig(temperature=0.05, learnable_temperature=False, symmetric=False)
    loss_fn = build_loss(cfg).double()
    assert list(loss_fn.parameters()) == []
    q, k = _unit(10), _unit(10, seed=1)
    torch.testing.assert_close(loss_fn(q, k), info_nce(q, k, 20.0, symmetric=False))
    assert "log_scale" in loss_fn.state_dict()


def test_model_scale_overrides_own_and_gets_the_gradient():
    loss_fn = build_loss(LossConfig()).double()
    log_s = torch.tensor(math.log(30.0), dtype=torch.float64, requires_grad=True)
    q, k = _unit(12), _unit(12, seed=2)
    loss = loss_fn(q, k, logit_scale=log_s.exp())
    torch.testing.assert_close(loss, ClipLoss()(q, k, log_s.exp().detach()), rtol=1e-12, atol=0)
    loss.backward()
    assert log_s.grad is not None and loss_fn.log_scale.grad is None


def test_siglip_module_own_and_model_scale_bias():
    loss_fn = build_loss(LossConfig(name="siglip")).double()
    q, k = _unit(12), _unit(12, seed=3)
    own = SigLipLoss()(q, k, loss_fn.logit_scale.detach(), loss_fn.bias.detach())
    torch.testing.assert_close(loss_fn(q, k), own, rtol=1e-12, atol=0)
    assert math.isclose(loss_fn.logit_scale.item(), 10.0, rel_tol=1e-6)
    assert loss_fn.bias.item() == -10.0
    s, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    out = loss_fn(q, k, logit_scale=s, logit_bias=b)
    torch.testing.assert_close(out, SigLipLoss()(q, k, s, b), rtol=1e-12, atol=0)
    loss_fn(q, k).backward()
    assert loss_fn.bias.grad is not None and loss_fn.log_scale.grad is not None


def test_clamp_caps_own_scale():
    loss_fn = build_loss(LossConfig(max_logit_scale=50.0))
    with torch.no_grad():
        loss_fn.log_scale.fill_(math.log(80.0))
    loss_fn.clamp_()
    assert math.isclose(loss_fn.logit_scale.item(), 50.0, rel_tol=1e-6)


def test_queue_is_a_fifo_and_checkpoints():
    qu = NegativeQueue(5)
    assert qu.get() is None
    qu.push(torch.arange(6.0).view(3, 2))
    qu.push(torch.arange(6.0, 12.0).view(3, 2))  # 6 rows into 5 slots: the first row is dropped
    assert sorted(qu.get()[:, 0].tolist()) == [2.0, 4.0, 6.0, 8.0, 10.0]
    qu.push(torch.arange(100.0, 114.0).view(7, 2))  # larger than the queue: keep the newest 5
    assert sorted(qu.get()[:, 0].tolist()) == [104.0, 106.0, 108.0, 110.0, 112.0]
    fresh = NegativeQueue(5)
    fresh.load_state_dict(qu.state_dict())
    torch.testing.assert_close(fresh.get(), qu.get())
    assert int(fresh.ptr) == int(qu.ptr)
    with pytest.raises(ValueError, match="dim"):
        qu.push(torch.zeros(2, 3))


@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_loss_with_queue_uses_past_keys_as_negatives(name):
    loss_fn = build_loss(LossConfig(name=name, queue_size=8)).double()
    q1, k1, q2, k2 = _unit(6), _unit(6, seed=1), _unit(6, seed=2), _unit(6, seed=3)
    first = loss_fn(q1, k1)
    torch.testing.assert_close(first, build_loss(LossConfig(name=name)).double()(q1, k1))
    second = loss_fn(q2, k2)  # queue now holds k1
    s = loss_fn.logit_scale.detach()
    if name == "infonce":
        ref = info_nce(q2, k2, s, extra_negatives=k1)
        keys = torch.cat([k2, k1])
        logits = s * q2 @ keys.T
        labels = torch.arange(6)
        naive = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :6].T, labels))
        torch.testing.assert_close(ref, naive, rtol=1e-12, atol=0)
    else:
        b = loss_fn.bias.detach()
        logits = s * q2 @ torch.cat([k2, k1]).T + b
        z = -torch.ones_like(logits)
        z[:, :6] += 2 * torch.eye(6, dtype=z.dtype)
        ref = -F.logsigmoid(z * logits).sum() / 6
    torch.testing.assert_close(second, ref, rtol=1e-12, atol=0)
    loss_fn.eval()  # evaluation: in-batch loss only, queue untouched
    ptr = int(loss_fn.queue.ptr)
    torch.testing.assert_close(loss_fn(q2, k2), build_loss(LossConfig(name=name)).double()(q2, k2))
    assert int(loss_fn.queue.ptr) == ptr


def test_module_rejects_bad_shapes():
    loss_fn = build_loss(LossConfig())
    with pytest.raises(ValueError, match="one shape"):
        loss_fn(torch.zeros(4, 3), torch.zeros(5, 3))
