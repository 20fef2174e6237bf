"""``Embedder.load`` / ``clipkit serve`` on an ONNX export: onnxruntime, no torch in the forward."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from embed_helpers import build_catalog_dir, make_images, png_bytes
from export_helpers import coco_images, exported

from clipkit.embed import Embedder

TOL = 1e-4


@pytest.fixture(scope="module")
def embedders(tmp_path_factory) -> tuple[Embedder, Embedder]:
    """(PyTorch Embedder, ONNX Embedder) of the same weights."""
    ref = Embedder.load(exported(tmp_path_factory, "open_clip"), device="cpu")
    return ref, Embedder.load(exported(tmp_path_factory, "onnx"))


def _captions(data_root: Path) -> list[str]:
    with open(data_root / "coco_mini" / "captions.tsv", newline="") as f:
        return [r["title"] for r in csv.DictReader(f, delimiter="\t")]


EDGE_TEXTS = [
    "",
    "   ",
    "A Dog's  life &amp; more!!",
    "“curly” quotes — and mojibake: cafÃ©",
    "ünïcode café 東京 2024 İstanbul ß ＦＵＬＬ",
    "emoji 😀🐶 tab\tnew\nline",
    "x " * 80,
]


def test_tokens_and_pixels_equal_torch(embedders, data_root: Path) -> None:
    """The torch-free tokenizer and preprocessing give open_clip's arrays exactly."""
    ref, onx = embedders
    texts = _captions(data_root) + EDGE_TEXTS
    np.testing.assert_array_equal(onx.model.tokenize(texts), ref.model.tokenize(texts).numpy())
    images = coco_images(data_root, 40, 10_000) + make_images(5)  # every crop offset parity
    images += [images[0].resize((64, 64)), images[1].resize((30, 200)), images[2].resize((20, 20))]
    got = onx.preprocess(images)  # (N, 3, 64, 64) float32
    assert got.dtype == torch.float32 and torch.equal(got, ref.preprocess(images))


def test_onnx_embedder_matches_pytorch(embedders, data_root: Path, tmp_path) -> None:
    ref, onx = embedders
    assert (onx.dim, onx.model_id) == (ref.dim, ref.model_id) and onx.onnx
    texts = _captions(data_root)[:37]
    np.testing.assert_allclose(onx.encode_text(texts, batch_size=17), ref.encode_text(texts),
                               rtol=0, atol=TOL)  # fmt: skip
    files = sorted((data_root / "coco_mini" / "train2017").glob("*.jpg"))[:9]
    imgs = [str(files[0]), files[1].read_bytes(), png_bytes(make_images(1)[0]), *files[2:]]
    a, b = onx.encode_image(imgs, batch_size=4), ref.encode_image(imgs)
    assert a.shape == (len(imgs), ref.dim)
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    x = torch.stack([ref.model.preprocess_eval(make_images(1)[0])] * 3)  # preprocessed tensors
    np.testing.assert_allclose(onx.encode_image(x), ref.encode_image(x), rtol=0, atol=TOL)
    single = onx.encode_text("a dog", output="torch")
    assert isinstance(single, torch.Tensor) and single.shape == (ref.dim,)
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        Embedder.load(onx.name, device="cuda")


def test_onnx_forward_imports_no_torch(embedders, data_root: Path) -> None:
    """Tokenize, preprocess and both towers of the ONNX reader run in a process without torch."""
    _, onx = embedders
    image = sorted((data_root / "coco_mini" / "train2017").glob("*.jpg"))[0]
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from clipkit.embed.onnx_model import OnnxModel\n"
        f"m = OnnxModel({onx.name!r})\n"
        "t = m.encode_text(m.tokenize(['a dog on a beach']))\n"
        f"i = m.encode_image(m.preprocess(Image.open({str(image)!r}).convert('RGB'))[None])\n"
        "assert t.shape == i.shape == (1, m.embed_dim)\n"
        "print('torch' in sys.modules, float(t[0] @ i[0]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    imported, sim = res.stdout.split()
    assert imported == "False"
    ref = onx.encode_text(["a dog on a beach"])[0] @ onx.encode_image([str(image)])[0]
    assert abs(float(sim) - float(ref)) < 1e-6


def test_serve_onnx_with_an_index_built_by_pytorch(embedders, tmp_path) -> None:
    """The service takes the ONNX Embedder; an index of the PyTorch model's vectors serves."""
    from fastapi.testclient import TestClient

    from clipkit.embed.app import create_app
    from clipkit.embed.catalog import Catalog

    ref, onx = embedders
    folder, ix = build_catalog_dir(ref, tmp_path)
    client = TestClient(create_app(onx, Catalog.load(ix)), base_url="http://localhost")
    info = client.get("/info").json()
    assert info["model"]["model_id"] == ref.model_id and info["dim"] == ref.dim
    r = client.post("/embed/text", json={"texts": ["random picture 7"]})
    np.testing.assert_allclose(r.json()["embeddings"], ref.encode_text(["random picture 7"]),
                               rtol=0, atol=TOL)  # fmt: skip
    blob = (folder / "07.png").read_bytes()
    hits = client.post("/search", files={"file": ("q.png", blob)}, data={"k": "1"}).json()
    assert hits["results"][0][0]["id"] == 7


def test_load_model_refuses_onnx_export_in_one_line(tmp_path_factory, capsys, tmp_path) -> None:
    from clipkit.cli import main

    onnx = exported(tmp_path_factory, "onnx")
    rc = main(["export", str(onnx), "--format", "hf", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "is an ONNX export" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
