"""Hostile input against the service (issue 17): every answer a 2xx or a 4xx with one JSON line,
never a 5xx; a keep-alive connection survives every 4xx; /health OK after.

Cases from the issue (huge and deep JSON, overflowing numbers and embeddings, JSON as text/plain,
foreign Host headers, absolute paths in answers, a client that left), plus hypothesis over JSON
bodies and schemathesis over the app's OpenAPI schema (positive and negative cases).
"""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from embed_helpers import build_catalog_dir, make_images, png_bytes
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_hostile_helpers import RawConnection, ServiceServer

from clipkit.embed.app import create_app
from clipkit.embed.catalog import Catalog
from clipkit.embed.limits import ServeLimits
from clipkit.embed.safejson import loads_bounded

LIMITS = dict(
    max_body_bytes=200_000, max_pixels=100 * 100, max_k=20, max_batch=8, max_json_items=50_000
)
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def built(embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    folder, ix = build_catalog_dir(embedder, root)
    return root, folder, Catalog.load(ix)


@pytest.fixture(scope="module")
def client(embedder, built) -> TestClient:
    app = create_app(embedder, built[2], ServeLimits(**LIMITS))
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def _one_line_4xx(status: int, body: bytes, what: object = "") -> str:
    assert 400 <= status < 500, (what, status, body[:300])
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail, (what, detail)
    return detail


def _hostile_bodies(dim: int) -> list[tuple[str, bytes, str]]:
    """(path, JSON body, a word the one-line answer must hold)."""
    big = "9" * 401
    return [
        ("/search", b'{"text": "dog", "k": 1e400}', "out of the float64 range"),
        ("/search", b'{"text": "dog", "k": -1e400}', "out of the float64 range"),
        ("/search", b'{"embedding": [' + big.encode() + b"], " + b'"k": 1}', "401 characters"),
        ("/search", b"[" * 1100 + b"]" * 1100, "nesting depth 1100"),
        ("/search", b'{"text": ' + b"[" * 1100 + b"]" * 1100 + b"}", "nesting depth"),
        ("/search", json.dumps({"embedding": [3e38] * dim, "k": 3}).encode(), "overflows"),
        ("/search", json.dumps({"embedding": [[3e38] * dim] * 2}).encode(), "overflows"),
        ("/search", b'{"embedding": [NaN, 1.0], "k": 1}', "NaN"),
        ("/search", b'{"embedding": [Infinity], "k": 1}', "Infinity"),
        ("/search", b'{"text": "dog", "k": 12345678901234567890}', "k: must be"),
        ("/search", b'{"text": "dog", "k": true}', "k: expected an integer"),
        ("/search", b'{"text": "dog", "k": 2.0}', "k: expected an integer"),
        ("/search", b'{"embedding": [[0.1, 0.2], [0.3]]}', "equal-length"),
        ("/search", b'{"embedding": [true, false]}', "list of numbers"),
        ("/search", b'{"embedding": []}', "list of numbers"),
        ("/search", b'{"embedding": [' + b"0," * 70_000 + b"0]}", "over 50000 values"),
        ("/search", b"[1, 2]", "JSON object"),
        ("/search", b'{"text": "\xff"}', "UTF-8"),
        ("/search", b'{"text": "dog"', "not valid JSON"),
        ("/embed/text", b'{"texts": [{"a": 1}]}', "text 0"),
        ("/embed/text", b'{"texts": "' + b"x" * 2001 + b'"}', "longer than"),
        ("/embed/image", b'{"images": ["' + base64.b64encode(b"GIF89a junk") + b'"]}', "image 0"),
    ]


def test_issue_cases_are_one_line_4xx_on_one_keepalive_connection(embedder, built) -> None:
    app = create_app(embedder, built[2], ServeLimits(**LIMITS))
    with ServiceServer(app, ServeLimits(**LIMITS)) as srv:
        conn = RawConnection(srv.port)
        for path, body, word in _hostile_bodies(embedder.dim):
            status, _, answer = conn.request("POST", path, body, JSON)
            detail = _one_line_4xx(status, answer, body[:60])
            assert word in detail, (body[:60], detail)
        body = b'{"text": "dog", "k": 1}'
        for headers, code in (
            ({"content-type": "text/plain"}, 415),
            ({"host": "evil.example"}, 421),
        ):
            status, _, answer = conn.request("POST", "/search", body, {**JSON, **headers})
            assert status == code, answer
            _one_line_4xx(status, answer, headers)
        # The same socket still serves: no 4xx above closed the keep-alive connection.
        status, _, answer = conn.request("GET", "/health")
        assert (status, json.loads(answer)) == (200, {"status": "ok"})
        status, _, answer = conn.request("POST", "/search", b'{"text": "a", "k": 2}', JSON)
        assert status == 200 and len(json.loads(answer)["results"][0]) == 2
        conn.close()


def test_json_only_as_application_json(client) -> None:
    body = b'{"text": "dog", "k": 1}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "", "application/jsonx"):
        r = client.post("/search", content=body, headers={"content-type": ctype})
        assert r.status_code == 415, (ctype, r.text)
        _one_line_4xx(r.status_code, r.content, ctype)
    r = client.post("/embed/text", files={"file": ("a.txt", b"x")})
    assert r.status_code == 415
    ok = client.post(
        "/search", content=body, headers={"content-type": "Application/JSON; charset=utf-8"}
    )
    assert ok.status_code == 200, ok.text


def test_host_allowlist(embedder, built) -> None:
    cat = built[2]
    strict = TestClient(create_app(embedder, cat), raise_server_exceptions=False)
    for host in ("evil.example", "evil.example:8000", "127.0.0.2", "localhost.evil.example", ""):
        r = strict.get("/health", headers={"host": host})
        assert r.status_code == 421, (host, r.status_code)
        assert "not served here" in _one_line_4xx(r.status_code, r.content, host)
    for host in ("localhost", "LOCALHOST:8000", "127.0.0.1:1", "[::1]", "[::1]:8000"):
        assert strict.get("/health", headers={"host": host}).status_code == 200, host
    for origin, code in (
        ("http://evil.example", 403),
        ("null", 403),
        ("http://localhost:8000", 200),
        ("http://127.0.0.1:1", 200),
    ):
        r = strict.get("/health", headers={"host": "localhost", "origin": origin})
        assert r.status_code == code, (origin, r.status_code)
    named = ServeLimits(allowed_hosts=("search.example",))
    r = TestClient(create_app(embedder, cat, named)).get(
        "/health", headers={"host": "search.example:80"}
    )
    assert r.status_code == 200
    anyhost = TestClient(create_app(embedder, cat, ServeLimits(allowed_hosts=("*",))))
    assert anyhost.get("/health", headers={"host": "evil.example"}).status_code == 200


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_answers_show_no_server_paths(embedder, built) -> None:
    root, folder, cat = built
    query = {"text": "random picture 3", "k": 12}

    def answers(limits: ServeLimits) -> list[str]:
        c = TestClient(create_app(embedder, cat, limits), base_url="http://localhost")
        hits = c.post("/search", json=query).json()["results"][0]
        return _strings(c.get("/info").json()) + _strings(hits)

    default = answers(ServeLimits())
    assert not [s for s in default if str(root) in s or os.path.isabs(s.split("#")[0])]
    c = TestClient(create_app(embedder, cat), base_url="http://localhost")
    hit = c.post("/search", json=query).json()["results"][0][0]
    assert hit["path"] == f"{hit['id']:02d}.png"  # relative to the images' folder
    assert hit["source_dir"] == "emb"  # outside the data root: its name only
    rooted = TestClient(
        create_app(embedder, cat, ServeLimits(data_root=str(root))), base_url="http://localhost"
    )
    hit = rooted.post("/search", json=query).json()["results"][0][0]
    assert (hit["path"], hit["source_dir"]) == (f"imgs/{hit['id']:02d}.png", "emb")
    absolute = answers(ServeLimits(absolute_paths=True))
    assert str(folder / "03.png") in absolute


def test_client_gone_while_waiting_is_dropped_before_decoding(embedder, built) -> None:
    limits = ServeLimits(**LIMITS)
    app = create_app(embedder, built[2], limits)
    blob = png_bytes(make_images(1)[0])
    body = json.dumps({"images": [base64.b64encode(blob).decode()]}).encode()
    with ServiceServer(app, limits) as srv, TestClient(app, base_url="http://localhost") as c:
        decode = app.state.lanes["decode"]
        assert decode.try_acquire(decode.capacity)  # the whole decode budget is busy
        try:
            before = c.get("/info").json()["stats"]
            conn = RawConnection(srv.port)
            conn.send_raw(
                b"POST /embed/image HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json"
                + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + 60  # hang guard: the request must be seen waiting
            while not decode.waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            assert decode.waiting == 1, "the request never waited for the decode budget"
            conn.close()  # the client leaves while its request waits
            while c.get("/info").json()["stats"]["dropped_requests"] == before["dropped_requests"]:
                assert time.monotonic() < deadline, "the request of the gone client was kept"
                time.sleep(0.02)
        finally:
            decode.release(decode.capacity)
        after = c.get("/info").json()["stats"]
        assert after["decoded_images"] == before["decoded_images"]  # its image never decoded
        assert decode.used == 0 and decode.waiting == 0
        assert c.get("/health").json() == {"status": "ok"}


# ------------------------------------------------------------------------- property-based
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=150, deadline=None, database=None)
@given(value=_json_values)
def test_loads_bounded_agrees_with_json_within_limits(value) -> None:
    raw = json.dumps(value).encode()
    assert loads_bounded(raw, max_depth=64, max_items=10_000, max_number_chars=400) == json.loads(
        raw
    )


@settings(max_examples=60, deadline=None, database=None)
@given(
    depth=st.integers(1, 200),
    limit=st.integers(1, 100),
    inner=st.sampled_from(["[]", "{}", "1", '"]"']),
)
def test_depth_limit_is_exact(depth: int, limit: int, inner: str) -> None:
    raw = ("[" * depth + inner + "]" * depth).encode()
    real = depth + (1 if inner in ("[]", "{}") else 0)
    if real > limit:
        with pytest.raises(ValueError, match=f"depth {real} exceeds"):
            loads_bounded(raw, max_depth=limit, max_items=10, max_number_chars=10)
    else:
        loads_bounded(raw, max_depth=limit, max_items=10, max_number_chars=10)


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/search", "/embed/text", "/embed/image"]),
    body=st.dictionaries(
        st.sampled_from(["text", "texts", "image", "images", "embedding", "k"]),
        _json_values,
        max_size=3,
    ),
)
def test_any_json_object_is_200_or_one_line_4xx(client, path: str, body: dict) -> None:
    r = client.post(path, content=json.dumps(body).encode(), headers=JSON)
    if r.status_code != 200:
        _one_line_4xx(r.status_code, r.content, (path, body))


# ------------------------------------------------------------------------------ schemathesis
def _fuzz(op, mode, seen: dict[int, int]) -> bool:
    """Run schemathesis' cases of one operation in one generation mode (25 examples).

    Returns False when the mode has no case for the operation (nothing to negate in GET /health).
    """
    from hypothesis.errors import Unsatisfiable

    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case) -> None:
        r = case.call(headers={"host": "localhost"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (op.label, mode, r.status_code, r.content[:300])
        if r.status_code >= 400:
            _one_line_4xx(r.status_code, r.content, (op.label, mode))

    try:
        fuzz()
    except Unsatisfiable:
        return False
    return True


def test_schemathesis_openapi_fuzz_no_5xx(embedder, built) -> None:
    """Every operation of /openapi.json, schemathesis' positive and negative cases (bounded)."""
    import schemathesis
    from schemathesis import GenerationMode

    app = create_app(embedder, built[2], ServeLimits(**LIMITS))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"host": "localhost"})
    ops = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in ops}
    assert {"POST /search", "POST /embed/text", "POST /embed/image", "GET /image/{id_}"} <= labels
    seen: dict[int, int] = {}
    ran = {
        (op.label, mode.value)
        for op in ops
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if _fuzz(op, mode, seen)
    }
    for label in ("POST /search", "POST /embed/text", "POST /embed/image", "GET /image/{id_}"):
        assert {(label, "positive"), (label, "negative")} <= ran, ran
    assert sum(seen.values()) >= 100 and any(400 <= s < 500 for s in seen), seen
    health = TestClient(app, base_url="http://localhost").get("/health")
    assert health.json() == {"status": "ok"}
