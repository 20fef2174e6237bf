"""MomentumTeacher: the EMA rule, the cosine schedule, no gradients, exact state round trip."""

import math

import pytest
import torch
from torch import nn

from clipkit.losses.teacher import MomentumTeacher, cosine_momentum


def test_cosine_schedule_ends_and_midpoint():
    assert cosine_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99, abs=1e-15)
    assert cosine_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995, abs=1e-15)
    assert cosine_momentum(100, 100, 0.99, 1.0) == 1.0
    assert cosine_momentum(500, 100, 0.99, 1.0) == 1.0  # past the end: final
    assert cosine_momentum(37, 100, 0.999, 0.999) == pytest.approx(0.999, abs=1e-15)
    with pytest.raises(ValueError, match="momentum"):
        cosine_momentum(0, 10, 1.5)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_momentum(0, 0, 0.99)


def test_update_is_the_ema_of_the_parameters_in_float64():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    teacher = MomentumTeacher(student, base=0.9, final=1.0)
    before = [p.clone() for p in teacher.module.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    m = teacher.update(student, step=1, total_steps=10)
    assert m == pytest.approx(0.9) and float(teacher.momentum) == pytest.approx(0.9)
    for t, b, s in zip(teacher.module.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=0, atol=1e-15)
        assert not t.requires_grad
    m5 = teacher.update(student, step=6, total_steps=10)
    assert m5 == pytest.approx(1.0 - 0.1 * (math.cos(math.pi * 0.5) + 1) / 2)


def test_forward_has_no_graph_and_state_round_trips():
    student = nn.Linear(3, 2)
    teacher = MomentumTeacher(student, 0.99, 1.0)
    out = teacher(torch.randn(4, 3, requires_grad=True))
    assert not out.requires_grad
    teacher.update(student, 3, 10)
    other = MomentumTeacher(nn.Linear(3, 2), 0.99, 1.0)
    other.load_state_dict(teacher.state_dict())
    for a, b in zip(teacher.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
