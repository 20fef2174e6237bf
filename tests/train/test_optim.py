import math

import pytest
import torch
from torch import nn

from clipkit.config.schema import OptimConfig
from clipkit.train.optim import build_optimizer, lr_lambda, param_groups


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr=0.1)
    f = lr_lambda(cfg, total_steps=110)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)
    vals = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_const_cooldown_and_constant():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="const-cooldown", cooldown_steps=20)
    f = lr_lambda(cfg, total_steps=100)
    assert f(0) == 1.0 and f(79) == 1.0
    assert f(90) == pytest.approx(0.5)
    g = lr_lambda(OptimConfig(lr=1.0, warmup_steps=0, schedule="constant"), 100)
    assert g(99) == 1.0


def test_unknown_schedule():
    with pytest.raises(ValueError, match="linear"):
        lr_lambda(OptimConfig(schedule="linear"), 10)


def test_no_decay_groups():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.ln_final = nn.LayerNorm(4)
            self.token_embedding = nn.Embedding(10, 4)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    m = M()
    decay, no_decay = param_groups([m], 0.2)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 5  # bias, ln w+b, embedding, logit_scale
    assert no_decay["weight_decay"] == 0.0
    # "all" (lightly's SSL benchmarks): every trainable parameter decays.
    everything, nothing = param_groups([m], 0.2, "all")
    assert len(everything["params"]) == 6 and not nothing["params"]
    with pytest.raises(ValueError, match="unknown optim.decay 'some'; valid: clip, all"):
        build_optimizer([m], OptimConfig(decay="some"))
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([m], OptimConfig())


def test_optimiser_by_name():
    model = nn.Linear(4, 3)
    sgd = build_optimizer([model], OptimConfig(name="sgd", lr=0.06, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 0.06
    assert isinstance(build_optimizer([model], OptimConfig()), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optim.name 'lamb'; valid: adamw, sgd"):
        build_optimizer([model], OptimConfig(name="lamb"))
