"""The service on real loopback HTTP under concurrent clients: no errors, still healthy."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
from embed_helpers import LiveServer, build_catalog_dir

from clipkit.embed.app import create_app
from clipkit.embed.catalog import Catalog


def test_16_concurrent_clients_mixed_requests(embedder, tmp_path) -> None:
    folder, ix = build_catalog_dir(embedder, tmp_path)
    img = base64.b64encode((folder / "04.png").read_bytes()).decode()
    bodies = [
        ("/embed/text", {"texts": ["a small test caption"]}),
        ("/search", {"text": "random picture 4", "k": 5}),
        ("/search", {"image": img, "k": 5}),
    ]
    with LiveServer(create_app(embedder, Catalog.load(ix))) as srv, httpx.Client() as client:

        def one(i: int) -> tuple[int, dict]:
            path, body = bodies[i % 3]
            r = client.post(srv.url + path, json=body, timeout=60)
            return r.status_code, r.json()

        with ThreadPoolExecutor(16) as pool:
            res = list(pool.map(one, range(96)))
        assert [c for c, _ in res] == [200] * 96
        top = {b["results"][0][0]["id"] for i, (_, b) in enumerate(res) if i % 3 == 2}
        assert top == {4}  # every concurrent image search found the same, right answer
        assert client.get(srv.url + "/health").json() == {"status": "ok"}


def test_chunked_body_over_limit_is_413(embedder) -> None:
    from clipkit.embed.app import ServeLimits

    with LiveServer(create_app(embedder, None, ServeLimits(max_body_bytes=1000))) as srv:

        def chunks():  # no Content-Length: the limit must hold while streaming
            yield b'{"texts": ["'
            for _ in range(10):
                yield b"x" * 300

        ctype = {"content-type": "application/json"}
        r = httpx.post(srv.url + "/embed/text", content=chunks(), headers=ctype, timeout=30)
        assert r.request.headers.get("transfer-encoding") == "chunked"
        assert r.status_code == 413 and "exceeds the limit of 1000 bytes" in r.json()["detail"]
        assert httpx.get(srv.url + "/health", timeout=10).json() == {"status": "ok"}
