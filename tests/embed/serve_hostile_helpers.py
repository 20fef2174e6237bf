"""Helpers of the hostile-input service tests: raw HTTP/1.1 exchanges, a live server with the
service's own uvicorn config, and images that are large once decoded but tiny on the wire."""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from typing import Any

import h11


def png16(width: int, height: int, color_type: int = 0) -> bytes:
    """A constant 16-bit PNG (``color_type`` 0 grey -> PIL ``I;16``, 2 RGB, 6 RGBA).

    A few KiB on the wire, ``width * height`` pixels once decoded (PIL writes no 16-bit RGB).
    """
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    raw = zlib.compress((b"\0" + b"\x80" * (2 * channels * width)) * height, 9)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data))
        return struct.pack(">I", len(data)) + tag + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawConnection:
    """One keep-alive TCP connection speaking HTTP/1.1 through h11 (client side).

    ``request`` returns ``(status, headers, body)``; ``closed_by_server`` tells whether the
    server closed the connection. ``timeout`` is a hang guard, not a timing assertion.
    """

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)
        self.port = port

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket (half requests, stalls)."""
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one complete request and read its response."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = {"host": f"127.0.0.1:{self.port}", "content-length": str(len(body))}
        hdrs.update(headers or {})
        out = self.conn.send(h11.Request(method=method, target=path, headers=list(hdrs.items())))
        out += self.conn.send(h11.Data(data=body)) if body else b""
        out += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(out)
        return self.response()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """Read one response."""
        status, headers, body = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, headers, body

    def read_until_closed(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


class ServiceServer:
    """The app on 127.0.0.1 (free port) under :func:`clipkit.embed.server.server_config`."""

    def __init__(self, app: Any, limits: Any) -> None:
        import uvicorn

        from clipkit.embed.server import server_config

        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, limits))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServiceServer:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60  # hang guard
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
