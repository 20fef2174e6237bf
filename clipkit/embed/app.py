"""The retrieval service: FastAPI app for embedding, search and the search page.

Endpoints: ``POST /embed/text``, ``POST /embed/image`` (multipart ``file``/``files`` or JSON
base64 ``images``), ``POST /search`` (by ``text``, ``image`` or ``embedding``; JSON, or multipart
``file`` + ``k`` from the page), ``GET /health``, ``GET /info``, ``GET /image/{id}`` and the page
at ``/``; OpenAPI docs at ``/docs``. Bad input is a 4xx with ``{"detail": "<one line>"}``.

Hostile input is bounded before work is done (:mod:`clipkit.embed.limits`): the ``Host`` header,
the body's size, time and memory (:mod:`clipkit.embed.guards`), JSON depth, value count and number
size (:mod:`clipkit.embed.safejson`, JSON only as ``application/json``), each image's pixels and
decode memory (read from its header, reserved from the decode budget before decoding). A request
whose client has gone is dropped before each decode and before the model runs.

Example:
    >>> app = create_app(Embedder.load("export"), Catalog.load("index"))
    >>> # uvicorn.Server(server_config(app, "127.0.0.1", 8000, ServeLimits())).run()
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.requests import ClientDisconnect

from clipkit.embed.catalog import Catalog
from clipkit.embed.embedder import Embedder, load_image
from clipkit.embed.guards import Admission
from clipkit.embed.limits import Accountant, ClientGone, ServeLimits, decode_cost
from clipkit.embed.safejson import loads_bounded
from clipkit.embed.thumbs import ImageUnavailable, PathView, open_image

PAGE = Path(__file__).with_name("static") / "index.html"
_F32_MAX = float(np.finfo(np.float32).max)
GONE_POLL_S = 0.05  # how often a running request checks that its client is still there

# Request bodies as the OpenAPI schema documents them (and schemathesis fuzzes them).
_TEXTS = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
    ]
}
_VECTOR = {"type": "array", "items": {"type": "number"}}
_BODIES = {
    "embed_text": {
        "type": "object",
        "properties": {"texts": _TEXTS, "text": _TEXTS},
    },
    "embed_image": {
        "type": "object",
        "properties": {"images": _TEXTS, "image": _TEXTS},
        "description": "base64 images (a data: URL prefix is allowed)",
    },
    "search": {
        "type": "object",
        "properties": {
            "text": _TEXTS,
            "image": _TEXTS,
            "embedding": {"oneOf": [_VECTOR, {"type": "array", "items": _VECTOR}]},
            "k": {"type": "integer"},
        },
    },
}


def _body_doc(name: str, multipart: bool) -> dict:
    content: dict = {"application/json": {"schema": _BODIES[name]}}
    if multipart:
        files = {"type": "array", "items": {"type": "string", "format": "binary"}}
        form = {"file": {"type": "string", "format": "binary"}, "files": files}
        if name == "search":
            form["k"] = {"type": "integer"}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": form}}
    return {"requestBody": {"required": True, "content": content}}


def _fail(status: int, msg: str) -> HTTPException:
    return HTTPException(status_code=status, detail=msg)


def create_app(
    embedder: Embedder, catalog: Catalog | None, limits: ServeLimits | None = None
) -> FastAPI:
    """Build the FastAPI app over an embedder and (optionally) a catalog to search.

    Raises:
        ValueError: the catalog's vectors come from another model than ``embedder``.
    """
    lim = limits or ServeLimits()
    if catalog is not None:
        catalog.index._check_model(embedder.model_id, "the served model's vectors")
    view = PathView.of_catalog(
        catalog.metadata if catalog is not None else None, lim.data_root, lim.absolute_paths
    )
    body_lane = Accountant(lim.body_lane_bytes, "body memory")
    decode_lane = Accountant(lim.decode_lane_bytes, "decode memory")
    model_lock = threading.Lock()  # one forward at a time: torch already uses every core
    # Bytes of one image's model input (the decode reservation counts 2 per image: the
    # per-image tensors and their stacked batch).
    input_bytes = embedder.preprocess([Image.new("RGB", (8, 8))]).nbytes
    stats = {"decoded_images": 0, "dropped_requests": 0}

    app = FastAPI(title="clipkit retrieval", version="1", description=__doc__.split("\n\n")[1])
    app.add_middleware(Admission, limits=lim, body_lane=body_lane)
    app.state.lanes = {"body": body_lane, "decode": decode_lane}
    app.state.stats = stats

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        e = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in e.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {e.get('msg', 'invalid request')}"}, 422)

    @app.exception_handler(ValueError)
    async def _value(_: Request, err: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(err).splitlines()[0]}, 400)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, __: Exception) -> Response:
        stats["dropped_requests"] += 1  # nobody reads the answer
        return JSONResponse({"detail": "client disconnected"}, 400)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error ({type(err).__name__})"}, 500)

    async def _json(request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise _fail(415, f"expected Content-Type application/json, got {ctype[:60]!r}")
        body = loads_bounded(
            await request.body(), lim.max_json_depth, lim.max_json_items, lim.max_number_chars
        )
        if not isinstance(body, dict):
            raise _fail(400, "body must be a JSON object")
        return body

    def _items(value: Any, what: str, expected: str) -> list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise _fail(400, f"{what}: expected {expected}")
        if len(items) > lim.max_batch:
            raise _fail(413, f"{what}: {len(items)} items exceed the batch limit {lim.max_batch}")
        return items

    def _texts(value: Any) -> list[str]:
        items = _items(value, "text", "a non-empty string or list of strings")
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t.strip():
                raise _fail(400, f"text {i}: must be a non-empty string")
            if len(t) > lim.max_text_chars:
                raise _fail(413, f"text {i}: longer than {lim.max_text_chars} characters")
        return items

    def _b64_images(value: Any) -> list[bytes]:
        items = _items(value, "image", "a base64 string or a non-empty list of them")
        out = []
        for i, s in enumerate(items):
            if not isinstance(s, str):
                raise _fail(400, f"image {i}: expected a base64 string")
            try:
                out.append(base64.b64decode(s.split(",", 1)[-1], validate=True))
            except (binascii.Error, ValueError):
                raise _fail(400, f"image {i}: not valid base64") from None
        return out

    async def _form_images(request: Request) -> tuple[list[bytes], Any]:
        form = await request.form(max_files=lim.max_batch, max_fields=16)
        files = [f for f in form.getlist("file") + form.getlist("files") if hasattr(f, "read")]
        if not files:
            raise _fail(400, "multipart body needs an image in field 'file' or 'files'")
        if len(files) > lim.max_batch:
            raise _fail(413, f"{len(files)} files exceed the batch limit {lim.max_batch}")
        return [await f.read() for f in files], form

    def _header(blob: bytes, i: int) -> int:
        """Decode cost of image ``i`` from its header (no pixels decoded); 4xx when refused."""
        try:
            head = Image.open(io.BytesIO(blob))
        except Exception as err:  # PIL raises many types for bytes that are no image
            raise _fail(400, f"image {i}: not a readable image ({type(err).__name__})") from None
        w, h = head.size
        if w * h > lim.max_pixels:
            raise _fail(
                413, f"image {i}: {w}x{h} = {w * h} pixels exceed the limit {lim.max_pixels}"
            )
        return decode_cost(head.mode, w, h)

    def _prepare(blob: bytes, i: int) -> torch.Tensor:
        img = load_image(blob, lim.max_pixels, f"image {i}")
        return embedder.preprocess([img], offset=i)  # (1, 3, H, W)

    async def _in_thread(request: Request, work: Callable[[threading.Event], Any]) -> Any:
        """``work(gone)`` in a worker thread while a watcher sets ``gone`` if the client leaves.

        ``work`` checks ``gone`` before each decode and after taking the model lock, and returns
        None when it is set. Threads hand the model lock to each other directly: a hand-over
        through the event loop waits behind every other request's parsing (bench/README,
        "Service under load").
        """
        gone = threading.Event()

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(GONE_POLL_S)
            gone.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                out = await run_in_threadpool(work, gone)
            finally:
                tg.cancel_scope.cancel()
        if out is None:
            raise ClientGone
        return out

    async def _encode_images(request: Request, blobs: list[bytes]) -> np.ndarray:
        costs = [_header(b, i) for i, b in enumerate(blobs)]
        need = max(costs) + 2 * len(blobs) * input_bytes
        if need > decode_lane.capacity:
            raise _fail(
                413,
                f"decoding these {len(blobs)} images needs {need >> 20} MiB, over the decode "
                f"budget of {decode_lane.capacity >> 20} MiB (a quarter of the memory budget "
                "is for bodies): send fewer or smaller images",
            )

        def work(gone: threading.Event) -> np.ndarray | None:
            parts = []
            for i, blob in enumerate(blobs):  # one at a time: the reservation holds one decode
                if gone.is_set():
                    return None
                parts.append(_prepare(blob, i))
                stats["decoded_images"] += 1
            x = torch.cat(parts)  # (B, 3, H, W)
            del parts
            with model_lock:
                return None if gone.is_set() else embedder.encode_image(x, progress=False)

        async with decode_lane.hold(need, request.is_disconnected):
            return await _in_thread(request, work)

    async def _encode_texts(request: Request, texts: list[str]) -> np.ndarray:
        def work(gone: threading.Event) -> np.ndarray | None:
            with model_lock:
                return None if gone.is_set() else embedder.encode_text(texts, progress=False)

        return await _in_thread(request, work)

    def _is_multipart(request: Request) -> bool:
        return request.headers.get("content-type", "").startswith("multipart/form-data")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        """Liveness: ``{"status": "ok"}``."""
        return {"status": "ok"}

    def _model_info(info: dict) -> dict:
        name = info.get("name")
        if isinstance(name, str) and not name.startswith("open_clip:"):
            info = {**info, "name": view.show(name)}
        return info

    @app.get("/info")
    async def info() -> dict:
        """Model, index size and dimension, limits, memory lanes and counters."""
        idx = catalog.index if catalog is not None else None
        shown = {k: v for k, v in asdict(lim).items() if k != "data_root"}
        shown["paths"] = "absolute" if lim.absolute_paths else "relative to the data root"
        return {
            "model": _model_info(embedder.info()),
            "dim": embedder.dim,
            "index": None
            if idx is None
            else {
                "size": len(idx),
                "kind": idx.kind,
                "dim": idx.dim,
                "model": _model_info(idx.model),
            },
            "limits": shown,
            "memory": {
                name: {"capacity": a.capacity, "used": a.used, "peak": a.peak, "waiting": a.waiting}
                for name, a in (("body", body_lane), ("decode", decode_lane))
            },
            "stats": dict(stats),
        }

    @app.post("/embed/text", openapi_extra=_body_doc("embed_text", False))
    async def embed_text(request: Request) -> dict:
        """``{"texts": [str, ...]}`` -> ``{"embeddings": [[float]*D]*N}`` (L2-normalised)."""
        body = await _json(request)
        texts = _texts(body.get("texts", body.get("text")))
        vec = await _encode_texts(request, texts)
        return {"embeddings": vec.tolist(), "dim": embedder.dim, "model_id": embedder.model_id}

    @app.post("/embed/image", openapi_extra=_body_doc("embed_image", True))
    async def embed_image(request: Request) -> dict:
        """Multipart ``file``/``files`` or JSON ``{"images": [base64, ...]}`` -> embeddings."""
        if _is_multipart(request):
            blobs, _ = await _form_images(request)
        else:
            body = await _json(request)
            blobs = _b64_images(body.get("images", body.get("image")))
        vec = await _encode_images(request, blobs)
        return {"embeddings": vec.tolist(), "dim": embedder.dim, "model_id": embedder.model_id}

    @app.post("/search", openapi_extra=_body_doc("search", True))
    async def search(request: Request) -> dict:
        """``{"text"|"image"|"embedding": ..., "k": 10}`` -> per query a list of hits
        ``{"id", "score", "key", "caption", ...}``. Multipart: ``file`` + form field ``k``."""
        if catalog is None:
            raise _fail(404, "this server has no index; start it with --index")
        if _is_multipart(request):
            blobs, form = await _form_images(request)
            k = _k(form.get("k", 10))
            kind, vec = "image", await _encode_images(request, blobs)
        else:
            body = await _json(request)
            given = [f for f in ("text", "image", "embedding") if body.get(f) is not None]
            if len(given) != 1:
                raise _fail(400, "give exactly one of 'text', 'image' or 'embedding'")
            kind, k = given[0], _k(body.get("k", 10))
            if kind == "text":
                vec = await _encode_texts(request, _texts(body["text"]))
            elif kind == "image":
                vec = await _encode_images(request, _b64_images(body["image"]))
            else:
                vec = _embedding(body["embedding"])
        mid = embedder.model_id if kind != "embedding" else None
        results = await run_in_threadpool(catalog.search, vec, k, mid)
        for hits in results:
            if any(not math.isfinite(h["score"]) for h in hits):
                norm = float(np.linalg.norm(vec.astype(np.float64), axis=1).max())
                raise _fail(
                    422,
                    f"embedding: scores overflow float32 (query norm {norm:.3g}); send "
                    "unit-length vectors",
                )
        return {"query": kind, "k": k, "results": [[view.row(h) for h in r] for r in results]}

    def _k(value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 9:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(400, f"k: expected an integer, got {str(value)[:40]!r}")
        if not 1 <= value <= lim.max_k:
            raise _fail(400, f"k: must be an integer in 1..{lim.max_k}, got {str(value)[:40]}")
        return value

    def _embedding(value: Any) -> np.ndarray:
        rows = (
            value if isinstance(value, list) and value and isinstance(value[0], list) else [value]
        )
        if (
            not all(isinstance(r, list) and r and all(_is_number(v) for v in r) for r in rows)
            or len({len(r) for r in rows}) != 1
        ):
            raise _fail(
                400, "embedding: expected a list of numbers (or a list of equal-length such lists)"
            )
        if len(rows) > lim.max_batch:
            raise _fail(
                413, f"embedding: {len(rows)} vectors exceed the batch limit {lim.max_batch}"
            )
        x = np.asarray(rows, dtype=np.float64)  # (N, D); JSON numbers are finite float64
        norm = float(np.linalg.norm(x, axis=1).max())
        if norm > _F32_MAX:  # its scores against unit-length vectors could overflow float32
            raise _fail(
                400,
                f"embedding: vector norm {norm:.3g} overflows float32; send unit-length vectors",
            )
        return x.astype(np.float32)

    @app.get("/image/{id_}")
    async def image(id_: int) -> Response:
        """The image of an indexed id (local file or shard member), for the page's grid.

        404 when the id has no image, 410 when its file or tar member is gone or damaged."""
        row = catalog.row(id_) if catalog is not None else None
        ref = (row or {}).get("path")
        if not isinstance(ref, str) or not ref:
            raise _fail(404, f"no image stored for id {id_}")
        try:
            chunks, media = await run_in_threadpool(
                open_image, ref, lim.max_body_bytes, view.show(ref)
            )
        except ImageUnavailable as err:
            raise _fail(err.status, f"image of id {id_}: {err.msg}") from None
        return StreamingResponse(chunks, media_type=media)

    return app


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
