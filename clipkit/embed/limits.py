"""The service's limits and its memory budget: what one request may hold, and all of them at once.

Memory the service spends on requests lives in two places, each reserved *before* it is spent:

- **bodies** (the body lane, a quarter of ``memory_budget_bytes``): a request's body is reserved
  before it is read (its ``Content-Length``, or ``max_body_bytes`` when chunked), at
  :func:`body_cost` bytes: 4x the body (the received chunks and their joined copy, then the
  body, its parsed JSON strings and the base64-decoded images) plus 64 bytes per JSON value;
- **decoding** (the decode lane, the other three quarters): before the first image of a request
  is decoded the request reserves its largest image's decode cost (:func:`decode_cost`, from the
  image header: width x height x bytes per pixel of its mode, measured) plus twice the model input
  of every image (the per-image tensors and their stacked batch). A request decodes its images one
  at a time, so it never holds more than that.

Two lanes, because a request holds its body while it waits for decoding: with one pool, bodies
could fill it and wait for each other forever. Each lane is a first-come-first-served
:class:`Accountant`; a reservation larger than its lane is refused at once (413). The model's
weights and one forward's activations (one forward at a time) come on top of the budget.

Example:
    >>> lim = ServeLimits(memory_budget_bytes=256 * 2**20)
    >>> lane = Accountant(lim.decode_lane_bytes, "decode")
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# Bytes per pixel that decoding an image of each PIL mode peaks at (decode, conversion to RGB,
# resize), measured as peak RSS over 2048x2048 images (RSS high-water mark, one per mode): RGB,
# RGBA, CMYK, L, P, 1, 16-bit RGB/RGBA PNGs 6.0-8.0; F 10.9; I;16 28.9 and I 34.8 (to_rgb scales
# them through float64). Each rounded up with >= 10% margin.
_MODE_BYTES_PER_PIXEL = {"I": 40, "F": 12}
_I16_BYTES_PER_PIXEL = 32
DEFAULT_BYTES_PER_PIXEL = 9
# Parsed JSON costs about this much per value (a float object + its list slot, a short str...).
JSON_VALUE_BYTES = 64


def decode_cost(mode: str, width: int, height: int) -> int:
    """Peak bytes that decoding a ``width`` x ``height`` image of PIL ``mode`` takes."""
    if mode.startswith("I;16"):
        per = _I16_BYTES_PER_PIXEL
    else:
        per = _MODE_BYTES_PER_PIXEL.get(mode, DEFAULT_BYTES_PER_PIXEL)
    return per * width * height


@dataclass
class ServeLimits:
    """Request limits of the service; anything beyond them is a 4xx with one JSON message.

    Attributes:
        max_body_bytes: request body size (declared or streamed); 413 beyond.
        max_pixels: pixels of one image (from its header, before decoding); 413 beyond.
        max_k: largest ``k`` of a search.
        max_batch: texts, images or vectors in one request.
        max_text_chars: characters of one text.
        memory_budget_bytes: bytes of request bodies and image decoding held at once across all
            requests (module docstring); requests wait their turn for it.
        max_json_depth: nesting depth of a JSON body (checked before parsing).
        max_json_items: JSON values in one body (checked before parsing).
        max_number_chars: characters of one JSON number (a 401-digit integer is refused).
        allowed_hosts: ``Host`` header names served (port ignored); ``"*"`` serves any. Other
            hosts get 421 (a DNS-rebinding page reaches a loopback service under its own name).
        body_timeout_s: the whole body must arrive within this many seconds of the first read;
            408 and the connection closed otherwise.
        header_timeout_s: a connection must send a request's complete headers within this many
            seconds (from connecting, or from the end of its previous response); else it is
            closed (408 when part of a request had come). Enforced by :mod:`clipkit.embed.server`.
        keep_alive_s: idle keep-alive connections are closed after this many seconds.
        max_header_bytes: headers still incomplete after this many buffered bytes are a 400
            (h11's limit; headers that arrive in one read are parsed whole).
        absolute_paths: show paths in responses as stored; by default they are relative to
            ``data_root``.
        data_root: folder that paths in responses are shown relative to (default: the common
            folder of the index's images); paths outside it are shown by file name only.
    """

    max_body_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096
    max_k: int = 100
    max_batch: int = 64
    max_text_chars: int = 2000
    memory_budget_bytes: int = 1024 * 2**20
    max_json_depth: int = 32
    max_json_items: int = 2**18
    max_number_chars: int = 64
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    body_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_header_bytes: int = 16 * 2**10
    absolute_paths: bool = False
    data_root: str | None = field(default=None)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("_s",)) and not (isinstance(v, int | float) and v > 0):
                raise ValueError(f"{f.name} must be a positive number of seconds, got {v!r}")
            if f.type == "int" and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"{f.name} must be a positive integer, got {v!r}")
        self.allowed_hosts = tuple(normalize_host(h) for h in self.allowed_hosts)
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: give at least one host name, or '*'")
        need = body_cost(self.max_body_bytes, self.max_json_items)
        if need > self.body_lane_bytes:
            raise ValueError(
                f"memory budget {_mib(self.memory_budget_bytes)} leaves "
                f"{_mib(self.body_lane_bytes)} for request bodies, but one body of "
                f"max_body_bytes {_mib(self.max_body_bytes)} needs {_mib(need)}: raise the "
                "budget or lower the body limit"
            )
        img = decode_cost("RGB", self.max_pixels, 1)
        if img > self.decode_lane_bytes:
            raise ValueError(
                f"memory budget {_mib(self.memory_budget_bytes)} leaves "
                f"{_mib(self.decode_lane_bytes)} for decoding, but one RGB image of max_pixels "
                f"{self.max_pixels} needs {_mib(img)}: raise the budget or lower max_pixels"
            )

    @property
    def body_lane_bytes(self) -> int:
        """The part of the budget for request bodies (a quarter)."""
        return self.memory_budget_bytes // 4

    @property
    def decode_lane_bytes(self) -> int:
        """The part of the budget for image decoding (three quarters)."""
        return self.memory_budget_bytes - self.body_lane_bytes

    def host_allowed(self, host: str) -> bool:
        """Whether a ``Host`` header value (with or without port) is served."""
        return "*" in self.allowed_hosts or normalize_host(host) in self.allowed_hosts


def body_cost(nbytes: int, max_json_items: int) -> int:
    """Bytes reserved for a body of ``nbytes`` (module docstring)."""
    # Every JSON value after the first in a container needs a comma: <= nbytes / 2 values.
    return 4 * nbytes + JSON_VALUE_BYTES * min(max_json_items, nbytes // 2 + 1)


def normalize_host(host: str) -> str:
    """``Host`` header value -> lower-case name without port (``[::1]:80`` -> ``[::1]``)."""
    h = host.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    if h.count(":") == 1:
        return h.split(":", 1)[0]
    if h.count(":") > 1:  # a bare IPv6 address
        return f"[{h}]"
    return h


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class ClientGone(Exception):
    """The client disconnected while its request waited; its work is dropped."""


class Accountant:
    """A first-come-first-served counting budget (bytes, or 1 for a lock), safe across threads.

    ``await acquire(n)`` waits until ``n`` units are free and every earlier waiter is served;
    ``release(n)`` may be called from any thread. While waiting, ``gone()`` is polled every
    ``poll_s`` seconds: when it says the client left, the wait ends with :class:`ClientGone`.

    Attributes:
        capacity: units in all. used, peak: units held now / at most so far.
    """

    def __init__(self, capacity: int, name: str, poll_s: float = 0.05) -> None:
        if capacity < 1:
            raise ValueError(f"{name}: capacity must be >= 1, got {capacity}")
        self.capacity, self.name, self.poll_s = capacity, name, poll_s
        self.used = self.peak = 0
        self._lock = threading.Lock()
        self._waiters: deque[list] = deque()  # [n, future, granted]

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        return len(self._waiters)

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` units now if they are free and nobody waits; True when taken."""
        with self._lock:
            if self._waiters or self.used + n > self.capacity:
                return False
            self._take(n)
            return True

    async def acquire(self, n: int, gone: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Wait for ``n`` units (FIFO).

        Raises:
            ValueError: ``n`` exceeds the capacity (it could never be granted).
            ClientGone: ``gone()`` turned true while waiting.
        """
        if n > self.capacity:
            raise ValueError(f"{self.name}: {n} exceeds the capacity {self.capacity}")
        with self._lock:
            if not self._waiters and self.used + n <= self.capacity:
                self._take(n)
                return
            entry = [n, asyncio.get_running_loop().create_future(), False]
            self._waiters.append(entry)
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(entry[1]), self.poll_s)
                    return
                except TimeoutError:
                    if gone is not None and await gone():
                        raise ClientGone from None
        except BaseException:
            with self._lock:
                if entry[2]:  # granted meanwhile: hand it back
                    self.used -= n
                else:
                    self._waiters.remove(entry)
                self._grant()
            raise

    def release(self, n: int) -> None:
        """Give back ``n`` units (from any thread) and serve the waiters that now fit."""
        with self._lock:
            self.used -= n
            self._grant()

    @contextlib.asynccontextmanager
    async def hold(
        self, n: int, gone: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[None]:
        """``async with lane.hold(n):`` acquire, then release on exit."""
        await self.acquire(n, gone)
        try:
            yield
        finally:
            self.release(n)

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        # Called with the lock held; strictly FIFO, so a large request is not starved.
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            entry = self._waiters.popleft()
            entry[2] = True
            self._take(entry[0])
            fut = entry[1]
            fut.get_loop().call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
