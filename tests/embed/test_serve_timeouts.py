"""Slow clients against the service (issue 17): half-sent headers, stalled uploads and idle
connections are cut off by the configured timeouts, while the service keeps serving others.

Timeouts are set to one second; the tests wait for the server's reaction (a hang
guard bounds the wait), they assert no durations.
"""

from __future__ import annotations

import json

import httpx
import pytest
from serve_hostile_helpers import RawConnection, ServiceServer

from clipkit.embed.app import create_app
from clipkit.embed.limits import ServeLimits

# Short, but long enough that a loaded machine never cuts off the requests that do arrive whole.
FAST = ServeLimits(header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=1.0)


@pytest.fixture(scope="module")
def server(embedder):
    with ServiceServer(create_app(embedder, None, FAST), FAST) as srv:
        yield srv


def _status_and_detail(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["detail"]


def test_half_sent_headers_are_408_and_closed(server) -> None:
    conn = RawConnection(server.port)
    conn.send_raw(b"POST /embed/text HTTP/1.1\r\nhost: localhost\r\ncontent-")  # then nothing
    status, detail = _status_and_detail(conn.read_until_closed())
    assert status == 408 and "headers not received within 1 s" in detail
    conn.close()


def test_silent_connection_is_closed(server) -> None:
    conn = RawConnection(server.port)
    assert conn.read_until_closed() == b""  # connected, sent nothing: closed without a word
    conn.close()


def test_stalled_upload_is_408_and_closed(server) -> None:
    conn = RawConnection(server.port)
    conn.send_raw(
        b"POST /embed/text HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        b'content-length: 1000\r\n\r\n{"texts": ["half'
    )
    status, detail = _status_and_detail(conn.read_until_closed())
    assert status == 408 and "body not received within 1 s" in detail
    conn.close()


def test_idle_keepalive_is_closed_after_an_answer(server) -> None:
    conn = RawConnection(server.port)
    status, _, body = conn.request("GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert conn.read_until_closed() == b""  # keep_alive_s later, the server closes it
    conn.close()


def test_oversized_or_garbled_headers_are_one_json_400(server) -> None:
    for raw in (
        # Headers still incomplete after 16 KiB (h11 checks what it has buffered).
        b"GET /health HTTP/1.1\r\nhost: localhost\r\nx-big: " + b"a" * 20_000,
        b"GARBAGE\x00 / HTTP/9\r\n\r\n",
    ):
        conn = RawConnection(server.port)
        conn.send_raw(raw)
        status, detail = _status_and_detail(conn.read_until_closed())
        assert status == 400 and detail.startswith("invalid HTTP request"), detail
        conn.close()


def test_service_still_serves(server) -> None:
    r = httpx.post(server.url + "/embed/text", json={"texts": ["still here"]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 1


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--memory-budget-mb", "8"], "leaves 2.0 MiB for request bodies"),
        (["--max-pixels", "100000000"], "for decoding, but one RGB image of --max-pixels"),
        (["--header-timeout", "0"], "--header-timeout must be a positive number"),
        (["--keep-alive", "-1"], "--keep-alive must be a positive number"),
    ],
)
def test_serve_refuses_bad_limits_in_one_line(flags, words, tiny_export, capsys) -> None:
    from clipkit.cli import main

    rc = main(["serve", "--model", str(tiny_export), "--port", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and len(err.splitlines()) == 1, err
