"""Admission of a request before the app sees it: its Host, its body's size, time and memory.

:class:`Admission` is the service's outermost ASGI middleware. In order:

1. ``Host`` not in :attr:`ServeLimits.allowed_hosts` -> 421 (DNS rebinding: a page on any site
   can make a browser send requests to 127.0.0.1 under that site's name); an ``Origin`` header
   (a browser's page) whose host is not allowed -> 403.
2. A declared ``Content-Length`` over ``max_body_bytes`` -> 413 before reading.
3. A request with a body reserves :func:`~clipkit.embed.limits.body_cost` bytes of the body
   lane (waiting its turn), released when its response is sent.
4. While the body is read: more than ``max_body_bytes`` streamed -> 413; the whole body not
   arrived ``body_timeout_s`` after the first read -> 408. Both close the connection (the rest
   of the body is never read).

Answers are JSON ``{"detail": "<one line>"}`` like the app's own.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import anyio
from fastapi.responses import JSONResponse

from clipkit.embed.limits import Accountant, ServeLimits, body_cost


class _Refused(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status, self.msg = status, msg


class Admission:
    """ASGI middleware enforcing the Host allowlist and the body limits (module docstring).

    Args:
        app: the wrapped ASGI app.
        limits: the service's limits.
        body_lane: the budget request bodies are reserved from.
    """

    def __init__(self, app: Any, limits: ServeLimits, body_lane: Accountant) -> None:
        self.app, self.lim, self.lane = app, limits, body_lane

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lim = self.lim
        headers = dict(scope.get("headers", []))
        host = headers.get(b"host", b"").decode("latin-1")
        if not lim.host_allowed(host):
            shown = host[:80] or "(none)"
            msg = f"Host {shown!r} is not served here; allowed: {', '.join(lim.allowed_hosts)}"
            return await _answer(421, msg, scope, receive, send)
        origin = headers.get(b"origin")
        if origin is not None and not lim.host_allowed(urlsplit(origin.decode("latin-1")).netloc):
            # A browser names the page that sent the request: another site's page may not use
            # the service (it could not read the answer, but it could make it work).
            shown = origin.decode("latin-1")[:80]
            return await _answer(
                403, f"cross-origin request from {shown!r} refused", scope, receive, send
            )
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        size = int(declared) if declared is not None and declared.isdigit() else None
        too_big = f"request body exceeds the limit of {lim.max_body_bytes} bytes"
        if size is not None and size > lim.max_body_bytes:
            return await _answer(413, too_big, scope, receive, send)
        if not chunked and not size:  # no body: nothing to reserve or time
            return await self.app(scope, receive, send)
        cost = body_cost(size if size is not None else lim.max_body_bytes, lim.max_json_items)
        seen, started, deadline = 0, False, None

        async def recv() -> dict:
            nonlocal seen, deadline
            if deadline is None:
                deadline = anyio.current_time() + lim.body_timeout_s
            try:
                with anyio.fail_after(max(deadline - anyio.current_time(), 0)):
                    m = await receive()
            except TimeoutError:
                raise _Refused(
                    408, f"request body not received within {lim.body_timeout_s:g} s"
                ) from None
            seen += len(m.get("body", b""))
            if seen > lim.max_body_bytes:
                raise _Refused(413, too_big)
            if not m.get("more_body", False):
                deadline = float("inf")  # body complete: later receives wait for a disconnect
            return m

        async def snd(m: dict) -> None:
            nonlocal started
            started = started or m["type"] == "http.response.start"
            await send(m)

        async with self.lane.hold(cost):
            try:
                await self.app(scope, recv, snd)
            except _Refused as err:
                if not started:
                    await _answer(err.status, err.msg, scope, receive, send, close=True)


async def _answer(
    status: int, msg: str, scope: dict, receive: Any, send: Any, close: bool = False
) -> None:
    headers = {"connection": "close"} if close else None
    await JSONResponse({"detail": msg}, status, headers=headers)(scope, receive, send)
