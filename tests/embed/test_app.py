"""The FastAPI service: embed and search endpoints, and 4xx (never 5xx) on malformed input."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from embed_helpers import build_catalog_dir, make_images, png_bytes
from fastapi.testclient import TestClient

from clipkit.embed import Embedder
from clipkit.embed.app import ServeLimits, create_app
from clipkit.embed.catalog import Catalog


@pytest.fixture(scope="module")
def served(embedder, tmp_path_factory):
    folder, ix = build_catalog_dir(embedder, tmp_path_factory.mktemp("app"))
    limits = ServeLimits(max_body_bytes=200_000, max_pixels=100 * 100, max_k=20, max_batch=8)
    client = TestClient(create_app(embedder, Catalog.load(ix), limits), base_url="http://localhost")
    return client, folder


def test_health_info_and_embed(served, embedder) -> None:
    client, folder = served
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["dim"] == embedder.dim and info["index"]["size"] == 12
    assert info["model"]["model_id"] == embedder.model_id and info["limits"]["max_k"] == 20
    r = client.post("/embed/text", json={"texts": ["a red car", "two dogs"]})
    assert r.status_code == 200
    got = np.asarray(r.json()["embeddings"], np.float32)
    np.testing.assert_allclose(got, embedder.encode_text(["a red car", "two dogs"]), atol=1e-6)
    blob = (folder / "03.png").read_bytes()
    ref = embedder.encode_image([blob])
    r1 = client.post("/embed/image", files=[("files", ("a.png", blob)), ("files", ("b.png", blob))])
    r2 = client.post("/embed/image", json={"images": [base64.b64encode(blob).decode()]})
    np.testing.assert_allclose(
        np.asarray(r1.json()["embeddings"]), np.vstack([ref, ref]), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(r2.json()["embeddings"]), ref, atol=1e-6)
    assert client.get("/image/3").content == blob
    assert client.get("/image/999").status_code == 404
    assert "/search" in client.get("/openapi.json").json()["paths"]
    assert "clipkit search" in client.get("/").text


def test_search_by_text_image_embedding(served, embedder) -> None:
    client, folder = served
    blob = (folder / "07.png").read_bytes()
    by_img = client.post("/search", json={"image": base64.b64encode(blob).decode(), "k": 3}).json()
    top = by_img["results"][0][0]
    assert top["id"] == 7 and top["caption"] == "random picture 7" and top["score"] > 0.99
    up = client.post("/search", files={"file": ("q.png", blob)}, data={"k": "2"}).json()
    assert [h["id"] for h in up["results"][0]] == [h["id"] for h in by_img["results"][0][:2]]
    vec = embedder.encode_text(["random picture 7"])[0]
    by_vec = client.post("/search", json={"embedding": vec.tolist(), "k": 5}).json()
    by_txt = client.post("/search", json={"text": ["random picture 7", "x"], "k": 5}).json()
    assert len(by_txt["results"]) == 2 and len(by_txt["results"][0]) == 5
    assert [h["id"] for h in by_vec["results"][0]] == [h["id"] for h in by_txt["results"][0]]


def _malformed(i: int, big_png: bytes) -> tuple[str, dict]:
    """The i-th of 10 kinds of bad request (varied by i)."""
    kind = i % 10
    if kind == 0:  # non-image bytes
        junk = base64.b64encode(b"not an image %d" % i).decode()
        return "/embed/image", {"json": {"images": [junk]}}
    if kind == 1:  # empty / blank text
        return "/embed/text", {"json": {"texts": ["ok", " " * (i % 3)]}}
    if kind == 2:  # wrong dimension
        return "/search", {"json": {"embedding": [0.1] * (3 + i % 5), "k": 3}}
    if kind == 3:  # k out of range or not an integer
        return "/search", {"json": {"text": "a cat", "k": [0, 21, -4, 2.5, "many"][i % 5]}}
    if kind == 4:  # not JSON
        return "/search", {
            "content": b"{text: oops" + bytes([i % 256]),
            "headers": {"content-type": "application/json"},
        }
    if kind == 5:  # body too large
        return "/embed/text", {"json": {"texts": ["x" * 300_000]}}
    if kind == 6:  # too many pixels
        return "/embed/image", {"files": {"file": ("big.png", big_png)}}
    if kind == 7:  # bad base64
        return "/search", {"json": {"image": "@@not base64@@" + str(i), "k": 2}}
    if kind == 8:  # zero or two query kinds
        body = {"k": 2} if i % 2 else {"text": "a", "embedding": [0.0], "k": 2}
        return "/search", {"json": body}
    # multipart without a file, batch over the limit, wrong types, NaN
    bad = [
        ("/search", {"data": {"k": "3"}, "files": {"other": ("x.txt", b"x")}}),
        ("/embed/text", {"json": {"texts": ["t"] * 9}}),
        ("/embed/text", {"json": {"texts": [1, 2]}}),
        (
            "/search",
            {
                "content": b'{"embedding": [NaN, 1], "k": 1}',
                "headers": {"content-type": "application/json"},
            },
        ),
    ]
    return bad[i % 4]


def test_200_malformed_requests_all_4xx(served) -> None:
    client, _ = served
    big_png = png_bytes(make_images(1)[0].resize((120, 120)))
    seen = {}
    for i in range(200):
        path, kw = _malformed(i, big_png)
        r = client.post(path, **kw)
        assert 400 <= r.status_code < 500, (i, path, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail, (i, detail)
        seen.setdefault(i % 10, set()).add(r.status_code)
    assert len(seen) == 10 and 413 in seen[5]
    assert client.get("/health").json() == {"status": "ok"}
    ok = client.post("/search", json={"text": "still works", "k": 1})
    assert ok.status_code == 200 and len(ok.json()["results"][0]) == 1


def test_refuses_index_of_another_model(served, tmp_path) -> None:
    _, folder = served
    ix = folder.parent / "ix"
    other = Embedder.load("open_clip:clipkit-tiny")
    with pytest.raises(ValueError, match="this index holds vectors of model"):
        create_app(other, Catalog.load(ix))
    bare = TestClient(create_app(other, None), base_url="http://localhost")
    r = bare.post("/search", json={"text": "x"})
    assert r.status_code == 404 and "no index" in json.loads(r.text)["detail"]
