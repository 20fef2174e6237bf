"""uvicorn, configured with the service's connection limits (what the ASGI app cannot see).

uvicorn times out only idle keep-alive connections, and only after a first response: a client
that connects and sends nothing, or half a request line, or headers one byte a minute, holds its
connection forever. :class:`HeaderTimeoutProtocol` (uvicorn's h11 protocol) closes a connection
whose next request's headers are not complete ``header_timeout_s`` after it connected or after its
previous response ended (408 first when part of a request had come). The rest:

- ``keep_alive_s`` -> uvicorn's ``timeout_keep_alive`` (idle connection between requests);
- ``max_header_bytes`` -> h11's ``max_incomplete_event_size`` (headers still incomplete after
  that many buffered bytes: 400, as JSON like every
  answer of the service: :meth:`HeaderTimeoutProtocol.send_400_response`);
- the body's size and time -> :class:`clipkit.embed.guards.Admission` (413 / 408).

Example:
    >>> server = uvicorn.Server(server_config(app, "127.0.0.1", 8000, limits))
    >>> server.run()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from clipkit.embed.limits import ServeLimits


class HeaderTimeoutProtocol(H11Protocol):
    """h11 protocol whose connections must send each request's headers in time."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers."""
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        """Start the clock for the next request's headers."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock."""
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (bad request line, headers over
        ``max_header_bytes``), as the service's one JSON line instead of plain text."""
        body = json.dumps({"detail": f"invalid HTTP request: {msg}"}).encode()
        self._write_raw(400, "Bad Request", body)

    def _write_raw(self, status: int, reason: str, body: bytes) -> None:
        # Bytes, not h11 events: h11 sends no Response before it has parsed a Request.
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self.transport.close()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        cycle = self.cycle  # a new request's headers replace it
        self._header_timer = self.loop.call_later(
            self.header_timeout_s, self._header_timeout, cycle
        )

    def _header_timeout(self, cycle: Any) -> None:
        self._header_timer = None
        busy = self.cycle is not cycle or (cycle is not None and not cycle.response_complete)
        if busy or self.transport.is_closing():
            return  # the headers came (a request is being served, or was)
        partial, _ = self.conn.trailing_data
        if partial and self.conn.their_state is h11.IDLE:
            msg = f"request headers not received within {self.header_timeout_s:g} s"
            self._write_raw(408, "Request Timeout", json.dumps({"detail": msg}).encode())
        self.transport.close()


def server_config(app: Any, host: str, port: int, limits: ServeLimits) -> uvicorn.Config:
    """A uvicorn config serving ``app`` on ``host:port`` under ``limits``' connection limits."""
    protocol = type(
        "HeaderTimeoutProtocol",
        (HeaderTimeoutProtocol,),
        {"header_timeout_s": limits.header_timeout_s},
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        log_level="warning",
    )
