"""MoCo's loss against lightly 1.6's NTXentLoss with a memory bank (float64, within 1e-10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipkit.config import LossConfig
from clipkit.losses import MoCoLoss, build_loss, info_nce, moco_loss, moco_v3_loss

# Installed by .ci/run with --no-deps (see test_ntxent.py).
lightly_loss = pytest.importorskip("lightly.loss", reason="pip install --no-deps lightly==1.6.0")

TOL = 1e-10


def _rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()


def _unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max error relative to the reference's size, absolute below 1."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _lightly_moco(temperature: float, bank: torch.Tensor):
    """lightly's MoCo criterion with its memory bank set to ``bank`` (Q, D)."""
    ref = lightly_loss.NTXentLoss(temperature, memory_bank_size=tuple(bank.shape)).double()
    ref.memory_bank.bank.copy_(bank)
    return ref


@pytest.mark.parametrize("n,q_size,chunk", [(1, 4, 0), (6, 24, 5), (16, 64, 7), (33, 99, 0)])
@pytest.mark.parametrize("d", [3, 32])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_matches_lightly_memory_bank_float64(n, q_size, chunk, d, temperature):
    g = torch.Generator().manual_seed(n * d + q_size)
    q, k, bank = _rows(n, d, g), _rows(n, d, g), _unit_rows(q_size, d, g)
    ref = _lightly_moco(temperature, bank)(q, k)
    out = moco_loss(q, k, bank, temperature, chunk_size=chunk)
    assert out.dtype == torch.float64
    assert _rel(out, ref) <= TOL
    # Both q and k get gradients: the function does not assume k is a momentum key.
    for go, gr in zip(torch.autograd.grad(out, (q, k)), torch.autograd.grad(ref, (q, k))):
        assert _rel(go, gr) <= TOL


def test_temperature_tensor_gradient():
    g = torch.Generator().manual_seed(1)
    q, k, bank = _rows(5, 4, g), _rows(5, 4, g), _unit_rows(20, 4, g)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    out = moco_loss(q, k, bank, t, chunk_size=3)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = torch.cat([(qn * kn).sum(-1, keepdim=True), qn @ bank.T], 1) / t
    ref = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    assert _rel(out, ref) <= TOL
    for go, gr in zip(torch.autograd.grad(out, (q, k, t)), torch.autograd.grad(ref, (q, k, t))):
        assert _rel(go, gr) <= TOL


def test_module_steps_and_queue_match_lightly():
    """Five steps of the module = lightly's criterion: losses, gradients, bank and pointer."""
    n, d, q_size, temperature = 6, 5, 24, 0.2
    g = torch.Generator().manual_seed(2)
    mine = build_loss(LossConfig(name="moco", temperature=temperature, queue_size=q_size,
                                 chunk_size=4)).double()  # fmt: skip
    assert isinstance(mine, MoCoLoss)
    ref = None
    scale = torch.tensor(1 / temperature, dtype=torch.float64)
    for _ in range(5):  # wraps the ring once (24 = 4 steps of 6)
        q, k = _rows(n, d, g), _rows(n, d, g)
        if ref is None:  # lightly draws its own random bank: give it ours
            mine._init_queue(k)
            ref = _lightly_moco(temperature, mine.queue.get())
        out, r = mine(q, k, logit_scale=scale), ref(q, k)
        assert _rel(out, r) <= TOL
        for go, gr in zip(torch.autograd.grad(out, (q, k)), torch.autograd.grad(r, (q, k))):
            assert _rel(go, gr) <= TOL
        assert torch.equal(mine.queue.get(), ref.memory_bank.bank)
        assert int(mine.queue.ptr) == int(ref.memory_bank.bank_ptr)


def test_direction_push_matches_lightly_called_once_per_direction():
    """loss.moco_push=direction, five steps = lightly's benchmark step, which calls its loss
    twice, ``0.5 * (crit(q1, k2) + crit(q2, k1))``, each call pushing its keys: the second
    call's negatives hold the first call's keys. Rows interleave the directions as the MoCo
    task makes them (view-1 query, view-2 query of each image)."""
    n, d, q_size, temperature = 6, 5, 48, 0.2
    g = torch.Generator().manual_seed(3)
    cfg = LossConfig(name="moco", temperature=temperature, queue_size=q_size, chunk_size=4,
                     moco_push="direction")  # fmt: skip
    mine = build_loss(cfg).double()
    assert mine.push == "direction"
    ref = None
    scale = torch.tensor(1 / temperature, dtype=torch.float64)
    for _ in range(5):  # wraps the ring (48 = 4 steps of 2 x 6)
        q1, q2, k1, k2 = (_rows(n, d, g) for _ in range(4))
        q = torch.stack([q1, q2], 1).flatten(0, 1)  # (2n, d) interleaved
        k = torch.stack([k2, k1], 1).flatten(0, 1)
        if ref is None:
            mine._init_queue(k)
            ref = _lightly_moco(temperature, mine.queue.get())
        out = mine(q, k, logit_scale=scale)
        r = 0.5 * (ref(q1, k2) + ref(q2, k1))
        assert _rel(out, r) <= TOL
        xs = (q1, q2, k1, k2)
        for go, gr in zip(torch.autograd.grad(out, xs), torch.autograd.grad(r, xs), strict=True):
            assert _rel(go, gr) <= TOL
        assert torch.equal(mine.queue.get(), ref.memory_bank.bank)
        assert int(mine.queue.ptr) == int(ref.memory_bank.bank_ptr)
    # The default ("step") differs: both directions see the queue as it was before the step.
    step = build_loss(LossConfig(name="moco", temperature=temperature, queue_size=q_size)).double()
    step._init_queue(k)
    before = step.queue.get().clone()
    want = 0.5 * (moco_loss(q1, k2, before, temperature) + moco_loss(q2, k1, before, temperature))
    assert _rel(step(q, k, logit_scale=scale), want) <= TOL
    with pytest.raises(ValueError, match="loss.moco_push='both'"):
        build_loss(LossConfig(name="moco", queue_size=8, moco_push="both"))


def test_queue_starts_random_unit_the_same_everywhere_and_checkpoints():
    a = MoCoLoss(0.2, queue_size=8)
    b = MoCoLoss(0.2, queue_size=8)
    x = torch.randn(4, 3)
    a(x, x)
    b.eval()
    b(x, x)  # evaluation: initialised, no push
    fresh = MoCoLoss(0.2, queue_size=8).eval()
    fresh(x, x)
    assert torch.equal(fresh.queue.get(), b.queue.get())  # a fixed seed: equal on every rank
    assert torch.allclose(b.queue.get().norm(dim=-1), torch.ones(8))
    assert int(b.queue.ptr) == 0 and int(a.queue.ptr) == 4
    # Rows 4..7 still hold the initial draw; rows 0..3 the normalised keys.
    assert torch.equal(a.queue.get()[4:], b.queue.get()[4:])
    assert torch.allclose(a.queue.get()[:4], F.normalize(x, dim=-1))
    c = MoCoLoss(0.2, queue_size=8)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.queue.get(), a.queue.get()) and int(c.queue.ptr) == 4


@pytest.mark.parametrize("q_size,batch", [(10, 4), (3, 4), (12, 8)])
def test_unusable_queue_size_is_one_line(q_size, batch):
    loss_fn = build_loss(LossConfig(name="moco", queue_size=q_size))
    x = torch.randn(batch, 3)
    with pytest.raises(ValueError, match=f"loss.queue_size={q_size} must be") as err:
        loss_fn(x, x)
    assert "\n" not in str(err.value)


def test_config_errors():
    with pytest.raises(ValueError, match="needs loss.queue_size >= 1"):
        build_loss(LossConfig(name="moco"))
    with pytest.raises(ValueError, match="no hard negatives"):
        build_loss(LossConfig(name="moco", queue_size=8))(
            torch.randn(4, 3), torch.randn(4, 3), hard_negatives=torch.randn(4, 3)
        )
    with pytest.raises(ValueError, match="queue is empty"):
        moco_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="queue must be"):
        moco_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(8, 2))


def test_peak_tensor_is_a_tile_not_n_by_queue(largest_output):
    g = torch.Generator().manual_seed(3)
    q, k = _rows(300, 8, g).float(), _rows(300, 8, g).float()
    bank = _unit_rows(2000, 8, g).float()
    with largest_output() as mode:
        moco_loss(q, k, bank, 0.2, chunk_size=64).backward()
    assert mode.largest <= max(2000 * 8, 64 * 64)  # the queue itself; 300 x 2000 would be 6e5


def test_moco_v3_is_the_papers_formula():
    """MoCo v3's code: CE(q k^T / T, arange) * 2T per direction, both directions summed."""
    g = torch.Generator().manual_seed(4)
    q1, q2, k1, k2 = (_rows(10, 6, g) for _ in range(4))
    t = 0.2

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
        return F.cross_entropy(logits, torch.arange(10)) * (2 * t)

    ref = ctr(q1, k2) + ctr(q2, k1)
    out = moco_v3_loss(q1, q2, k1, k2, t, chunk_size=3)
    assert _rel(out, ref) <= TOL
    inputs = (q1, q2, k1, k2)
    for go, gr in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        assert _rel(go, gr) <= TOL
    # and it is the one-directional info_nce underneath
    one = info_nce(F.normalize(q1, dim=1), F.normalize(k2, dim=1), 1 / t, symmetric=False)
    assert _rel(one.detach() * 2 * t, ctr(q1, k2).detach()) <= 1e-6  # float32 scale there


@pytest.mark.parametrize("n, d, t", [(1, 3, 1.0), (7, 16, 0.2), (32, 8, 1.0)])
def test_moco_v3_module_equals_the_pure_function_on_interleaved_views(n, d, t):
    """The registry's moco_v3 module de-interleaves rows and equals moco_v3_loss (float64)."""
    from clipkit.config.schema import LossConfig
    from clipkit.losses import build_loss, moco_v3_loss

    g = torch.Generator().manual_seed(n * 100 + d)
    q1, q2, k1, k2 = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4))
    q1.requires_grad_()
    ref = moco_v3_loss(q1, q2, k1, k2, t)
    (g_ref,) = torch.autograd.grad(ref, q1)
    # The module takes what the tasks' forward gives: unit rows, interleaved by image.
    q = torch.stack([F.normalize(q1, dim=-1), F.normalize(q2, dim=-1)], 1).flatten(0, 1)
    k = torch.stack([F.normalize(k1, dim=-1), F.normalize(k2, dim=-1)], 1).flatten(0, 1)
    mod = build_loss(LossConfig(name="moco_v3", temperature=t, learnable_temperature=False))
    scale = torch.tensor(1.0 / t, dtype=torch.float64)
    got = mod(q, k, logit_scale=scale)
    (g_got,) = torch.autograd.grad(got, q1)
    assert abs(got.item() - ref.item()) <= 1e-10
    assert (g_got - g_ref).abs().max().item() <= 1e-10
    with pytest.raises(ValueError, match="queue"):
        build_loss(LossConfig(name="moco_v3", queue_size=64, learnable_temperature=False))
