"""Embedder: same vectors as the model's own towers, any input kind, input order kept."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from embed_helpers import make_images

from clipkit.embed import Embedder
from clipkit.embed.embedder import load_image


def test_text_matches_tower(embedder: Embedder) -> None:
    texts = [f"a photo of thing number {i}" for i in range(13)]
    got = embedder.encode_text(texts, batch_size=5)
    with torch.no_grad():
        ref = embedder.model.encode_text(embedder.model.tokenize(texts)).numpy()
    assert got.shape == (13, embedder.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    raw = embedder.encode_text(texts, batch_size=5, normalize=False, output="torch")
    assert isinstance(raw, torch.Tensor)
    np.testing.assert_allclose(torch.nn.functional.normalize(raw, dim=-1).numpy(), ref, atol=1e-6)


def test_image_matches_tower_all_input_kinds(embedder: Embedder, tmp_path) -> None:
    imgs = make_images(6)
    paths, blobs = [], []
    for i, im in enumerate(imgs):
        p = tmp_path / f"{i}.png"
        im.save(p)
        paths.append(str(p))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    with torch.no_grad():
        x = torch.stack([embedder.model.preprocess_eval(im) for im in imgs])
        ref = embedder.model.encode_image(x).numpy()
    arrays = [np.asarray(im) for im in imgs]
    mixed = [paths[0], imgs[1], blobs[2], arrays[3], paths[4], blobs[5]]
    for inp in (imgs, paths, blobs, arrays, mixed):
        got = embedder.encode_image(inp, batch_size=4)
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(embedder.encode_image(x, batch_size=4), ref, atol=1e-6)
    one = embedder.encode_image(paths[2])
    assert one.shape == (embedder.dim,)
    np.testing.assert_allclose(one, ref[2], atol=1e-6)


def test_order_kept_across_batches(embedder: Embedder) -> None:
    texts = [f"caption {i}" for i in range(20)]
    full = embedder.encode_text(texts, batch_size=3)
    rev = embedder.encode_text(texts[::-1], batch_size=7)
    np.testing.assert_allclose(full[::-1], rev, atol=1e-6)
    assert embedder.encode_text([]).shape == (0, embedder.dim)


def test_bad_inputs_name_the_item(embedder: Embedder, tmp_path) -> None:
    with pytest.raises(ValueError, match="image 1: not a readable image"):
        embedder.encode_image([make_images(1)[0], b"not an image"])
    with pytest.raises(ValueError, match="file not found"):
        embedder.encode_image([str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="text 1: expected a string"):
        embedder.encode_text(["ok", 3])
    with pytest.raises(ValueError, match="exceeds the limit"):
        load_image(make_images(1)[0], max_pixels=100)
    with pytest.raises(ValueError, match="batch_size"):
        embedder.encode_text(["x"], batch_size=0)


def test_load_sources(tiny_export, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "export").symlink_to(tiny_export)
    a = Embedder.load(tiny_export)
    b = Embedder.load(run)
    assert a.model_id == b.model_id and len(a.model_id) == 16
    np.testing.assert_allclose(a.encode_text(["same"]), b.encode_text(["same"]), atol=1e-6)
    with pytest.raises(ValueError, match="not an export folder"):
        Embedder.load(tmp_path)
    with pytest.raises(ValueError, match="weights file not found"):
        Embedder.load("open_clip:clipkit-tiny", weights=str(tmp_path / "none.pt"))
    c = Embedder.load("open_clip:clipkit-tiny")
    assert c.dim == a.dim and c.model_id != a.model_id
