"""GradCache accumulation gives the gradient of the whole accumulated batch."""

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from clipkit.config.schema import ModelConfig, OptimConfig
from clipkit.models import build_dual_encoder
from clipkit.train.optim import build_optimizer
from clipkit.train.step import step_gradients

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _naive_loss(e):
    logits = e["logit_scale"] * e["q"] @ e["k"].T  # (N, N)
    labels = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _model(tmp_path, patch_dropout):
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"]["patch_dropout"] = patch_dropout
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    return build_dual_encoder(ModelConfig(name=str(path)))


def _batch(n=128):
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(n, 3, 16, 16, generator=g),
        "text": torch.randint(1, 49000, (n, 8), generator=g),
    }


def _embed(model):
    def fn(mb):
        out = model(image=mb["image"], text=mb["text"])
        return {"q": out["image"], "k": out["text"], "logit_scale": out["logit_scale"]}

    return fn


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _split(batch, n):
    size = len(batch["image"]) // n
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(n)]


@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_gradcache_equals_full_batch(tmp_path, patch_dropout):
    acc = Accelerator(cpu=True)
    model = _model(tmp_path, patch_dropout).train()
    ref = copy.deepcopy(model)
    batch = _batch()

    # Reference: the loss over all 128 samples in one autograd graph. With dropout the masks
    # must be those of 4 forwards of 32 (same RNG stream as GradCache's first pass).
    torch.manual_seed(123)
    chunks = [batch] if patch_dropout == 0 else _split(batch, 4)
    outs = [_embed(ref)(mb) for mb in chunks]
    full = {
        "q": torch.cat([o["q"] for o in outs]),
        "k": torch.cat([o["k"] for o in outs]),
        "logit_scale": outs[0]["logit_scale"],
    }
    ref_loss = _naive_loss(full)
    ref_loss.backward()

    torch.manual_seed(123)
    loss, finite = step_gradients(_split(batch, 4), _embed(model), _naive_loss, acc, model)
    assert finite
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
    g_ref, g = _grads(ref), _grads(model)
    assert g.keys() == g_ref.keys() and "clip.logit_scale" in g
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)

    # And the parameters after one step of the trainer's AdamW (the acceptance criterion).
    for m in (ref, model):
        build_optimizer([m], OptimConfig(lr=1e-3)).step()
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=n)


def test_plain_accumulation_is_not_exact(tmp_path):
    """Sanity check that the test above can fail: summing micro-batch losses differs."""
    model = _model(tmp_path, 0.0).train()
    batch = _batch()
    full = _naive_loss(_embed(model)(batch))
    parts = sum(_naive_loss(_embed(model)(mb)) for mb in _split(batch, 4)) / 4
    assert not torch.allclose(full, parts, rtol=1e-3)


def test_gradcache_extra_row_tensors_equal_full_batch():
    """A task's extra row tensors ("extra/<name>", any trailing shape) are concatenated over
    micro-batches and get their exact gradient, like q and k (float64, norm-wise 1e-12)."""
    torch.manual_seed(0)
    towers = torch.nn.ModuleDict(
        {n: torch.nn.Linear(6, 4).double() for n in ("q", "k", "view", "crops")}
    )
    x = torch.randn(12, 6, dtype=torch.float64)

    def embed(mb):
        xb = mb["x"]
        crops = (
            towers["crops"](xb).unsqueeze(1).expand(-1, 3, -1)
            * torch.arange(1.0, 4.0)[:, None].double()
        )  # (b, 3, 4): several rows' worth per sample
        return {
            "q": F.normalize(towers["q"](xb), dim=-1),
            "k": F.normalize(towers["k"](xb), dim=-1),
            "extra/view": towers["view"](xb),  # (b, 4)
            "extra/crops": crops,
        }

    def loss_fn(e):
        base = _naive_loss({**e, "logit_scale": torch.tensor(10.0, dtype=torch.float64)})
        # Non-separable over rows, so a wrong concatenation order or offset would show.
        return base + (e["extra/view"].T @ e["k"]).square().sum() + e["extra/crops"].std()

    loss_fn(embed({"x": x})).backward()
    ref = {n: p.grad.clone() for n, p in towers.named_parameters()}
    towers.zero_grad()
    micro = [{"x": x[:5]}, {"x": x[5:9]}, {"x": x[9:]}]  # unequal micro-batches
    from clipkit.train.gradcache import gradcache_step

    gradcache_step(micro, embed, loss_fn, lambda t: t.backward(), contextlib.nullcontext)
    for n, p in towers.named_parameters():
        err = (p.grad - ref[n]).norm() / ref[n].norm()
        assert err < 1e-12, (n, err.item())


def test_gradcache_shared_inputs_are_the_steps_and_get_their_gradient_once():
    """A task's step-wide input ("shared/<name>", any shape, the same for every micro-batch,
    e.g. SwAV's queue scores) is not concatenated, and a differentiable one gets its exact
    gradient once (float64, norm-wise 1e-12)."""
    torch.manual_seed(0)
    towers = torch.nn.ModuleDict({n: torch.nn.Linear(6, 4).double() for n in ("q", "k")})
    mix = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    x = torch.randn(9, 6, dtype=torch.float64)

    def embed(mb):
        return {
            "q": F.normalize(towers["q"](mb["x"]), dim=-1),
            "k": F.normalize(towers["k"](mb["x"]), dim=-1),
            "shared/mix": mix * 1.0,  # (4, 4): one per step, not per row
            "shared/fixed": torch.ones(2, 3, dtype=torch.float64),  # no autograd path
        }

    def loss_fn(e):
        assert e["shared/mix"].shape == (4, 4) and e["shared/fixed"].shape == (2, 3)
        base = _naive_loss({**e, "logit_scale": torch.tensor(10.0, dtype=torch.float64)})
        return base + (e["q"] @ e["shared/mix"] @ e["k"].T).sum() + e["shared/fixed"].sum()

    params = [*towers.parameters(), mix]
    loss_fn(embed({"x": x})).backward()
    ref = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    from clipkit.train.gradcache import gradcache_step

    micro = [{"x": x[:4]}, {"x": x[4:]}]
    gradcache_step(micro, embed, loss_fn, lambda t: t.backward(), contextlib.nullcontext)
    for p, r in zip(params, ref):
        assert (p.grad - r).norm() / r.norm() < 1e-12
