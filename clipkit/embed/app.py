"""The retrieval service: FastAPI app for embedding, search and the search page.

Endpoints: ``POST /embed/text``, ``POST /embed/image`` (multipart ``file``/``files`` or JSON
base64 ``images``), ``POST /search`` (by ``text``, ``image`` or ``embedding``; JSON, or multipart
``file`` + ``k`` from the page), ``GET /health``, ``GET /info``, ``GET /image/{id}`` and the page
at ``/``; OpenAPI docs at ``/docs``. Bad input is a 4xx with ``{"detail": "<one line>"}``.

Example:
    >>> app = create_app(Embedder.load("export"), Catalog.load("index"))
    >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from clipkit.data.sources import read_tar_image
from clipkit.embed.catalog import Catalog
from clipkit.embed.embedder import Embedder, load_image

PAGE = Path(__file__).with_name("static") / "index.html"


@dataclass
class ServeLimits:
    """Request limits; anything beyond them is refused with a 4xx."""

    max_body_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096
    max_k: int = 100
    max_batch: int = 64
    max_text_chars: int = 2000


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 when the body exceeds ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        msg = f"request body exceeds the limit of {self.max_bytes} bytes"
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": msg}, 413)(scope, receive, send)
        seen, started = 0, False

        async def recv() -> dict:
            nonlocal seen
            m = await receive()
            seen += len(m.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return m

        async def snd(m: dict) -> None:
            nonlocal started
            started = started or m["type"] == "http.response.start"
            await send(m)

        try:
            await self.app(scope, recv, snd)
        except _TooLarge:
            if not started:
                await JSONResponse({"detail": msg}, 413)(scope, receive, send)


def _fail(status: int, msg: str) -> HTTPException:
    return HTTPException(status_code=status, detail=msg)


def _read_shard_image(ref: str) -> bytes | None:
    """Bytes of ``<tar>#<key>``'s image (for the page's thumbnails), read by offset."""
    tar_path, _, key = ref.rpartition("#")
    return read_tar_image(tar_path, key)


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
    app = FastAPI(title="clipkit retrieval", version="1", description=__doc__.split("\n\n")[1])
    if lim.max_body_bytes:
        app.add_middleware(BodyLimit, max_bytes=lim.max_body_bytes)
    lock = threading.Lock()  # one forward at a time: torch already uses every core per call

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        e = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in e.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {e.get('msg', 'invalid request')}"}, 422)

    @app.exception_handler(ValueError)
    async def _value(_: Request, err: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(err).splitlines()[0]}, 400)

    async def _json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise _fail(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _fail(400, "body must be a JSON object")
        return body

    def _texts(value: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise _fail(400, "text: expected a non-empty string or list of strings")
        if len(items) > lim.max_batch:
            raise _fail(413, f"text: {len(items)} items exceed the batch limit {lim.max_batch}")
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t.strip():
                raise _fail(400, f"text {i}: must be a non-empty string")
            if len(t) > lim.max_text_chars:
                raise _fail(413, f"text {i}: longer than {lim.max_text_chars} characters")
        return items

    def _b64_images(value: Any) -> list[bytes]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise _fail(400, "image: expected a base64 string or a non-empty list of them")
        if len(items) > lim.max_batch:
            raise _fail(413, f"image: {len(items)} items exceed the batch limit {lim.max_batch}")
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
        form = await request.form()
        files = [f for f in form.getlist("file") + form.getlist("files") if hasattr(f, "read")]
        if not files:
            raise _fail(400, "multipart body needs an image in field 'file' or 'files'")
        if len(files) > lim.max_batch:
            raise _fail(413, f"{len(files)} files exceed the batch limit {lim.max_batch}")
        return [await f.read() for f in files], form

    def _encode_images(blobs: list[bytes]) -> np.ndarray:
        imgs = [load_image(b, lim.max_pixels, f"image {i}") for i, b in enumerate(blobs)]
        with lock:
            return embedder.encode_image(imgs, progress=False)  # (B, D)

    def _encode_texts(texts: list[str]) -> np.ndarray:
        with lock:
            return embedder.encode_text(texts, progress=False)  # (B, D)

    def _is_multipart(request: Request) -> bool:
        return request.headers.get("content-type", "").startswith("multipart/form-data")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        """Liveness: ``{"status": "ok"}``."""
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict:
        """Model, index size and dimension, limits."""
        idx = catalog.index if catalog is not None else None
        return {
            "model": embedder.info(),
            "dim": embedder.dim,
            "index": None
            if idx is None
            else {"size": len(idx), "kind": idx.kind, "dim": idx.dim, "model": idx.model},
            "limits": asdict(lim),
        }

    body_doc = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}}

    @app.post("/embed/text", openapi_extra=body_doc)
    async def embed_text(request: Request) -> dict:
        """``{"texts": [str, ...]}`` -> ``{"embeddings": [[float]*D]*N}`` (L2-normalised)."""
        body = await _json(request)
        texts = _texts(body.get("texts", body.get("text")))
        vec = await run_in_threadpool(_encode_texts, texts)
        return {"embeddings": vec.tolist(), "dim": embedder.dim, "model_id": embedder.model_id}

    @app.post("/embed/image", openapi_extra=body_doc)
    async def embed_image(request: Request) -> dict:
        """Multipart ``file``/``files`` or JSON ``{"images": [base64, ...]}`` -> embeddings."""
        if _is_multipart(request):
            blobs, _ = await _form_images(request)
        else:
            body = await _json(request)
            blobs = _b64_images(body.get("images", body.get("image")))
        vec = await run_in_threadpool(_encode_images, blobs)
        return {"embeddings": vec.tolist(), "dim": embedder.dim, "model_id": embedder.model_id}

    @app.post("/search", openapi_extra=body_doc)
    async def search(request: Request) -> dict:
        """``{"text"|"image"|"embedding": ..., "k": 10}`` -> per query a list of hits
        ``{"id", "score", "key", "caption", ...}``. Multipart: ``file`` + form field ``k``."""
        if catalog is None:
            raise _fail(404, "this server has no index; start it with --index")
        if _is_multipart(request):
            blobs, form = await _form_images(request)
            body: dict = {"k": form.get("k", 10)}
            kind, vec_fn = "image", (lambda: _encode_images(blobs))
        else:
            body = await _json(request)
            given = [f for f in ("text", "image", "embedding") if body.get(f) is not None]
            if len(given) != 1:
                raise _fail(400, "give exactly one of 'text', 'image' or 'embedding'")
            kind = given[0]
            if kind == "text":
                texts = _texts(body["text"])
                vec_fn = lambda: _encode_texts(texts)  # noqa: E731
            elif kind == "image":
                blobs = _b64_images(body["image"])
                vec_fn = lambda: _encode_images(blobs)  # noqa: E731
            else:
                vec_fn = lambda: _embedding(body["embedding"])  # noqa: E731
        k = _k(body.get("k", 10))
        vec = await run_in_threadpool(vec_fn)
        mid = embedder.model_id if kind != "embedding" else None
        results = await run_in_threadpool(catalog.search, vec, k, mid)
        return {"query": kind, "k": k, "results": results}

    def _k(value: Any) -> int:
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise _fail(400, f"k: expected an integer, got {value!r}") from None
        if isinstance(value, float | bool) or not 1 <= k <= lim.max_k:
            raise _fail(400, f"k: must be an integer in 1..{lim.max_k}, got {value!r}")
        return k

    def _embedding(value: Any) -> np.ndarray:
        try:
            x = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise _fail(
                400, "embedding: expected a list of numbers (or a list of such lists)"
            ) from None
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[0] == 0:
            raise _fail(400, f"embedding: expected shape (D,) or (N, D), got {x.shape}")
        if x.shape[0] > lim.max_batch:
            raise _fail(
                413, f"embedding: {x.shape[0]} vectors exceed the batch limit {lim.max_batch}"
            )
        return x

    @app.get("/image/{id_}")
    async def image(id_: int) -> Response:
        """The image of an indexed id (local file or shard member), for the page's grid."""
        row = catalog.row(id_) if catalog is not None else None
        ref = (row or {}).get("path")
        if not ref:
            raise _fail(404, f"no image stored for id {id_}")
        if Path(ref).is_file():
            return FileResponse(ref)
        data = await run_in_threadpool(_read_shard_image, ref) if "#" in ref else None
        if data is None:
            raise _fail(404, f"image of id {id_} is not readable here")
        return Response(data, media_type="image/jpeg")

    return app
