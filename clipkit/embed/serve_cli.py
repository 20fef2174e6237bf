"""``clipkit serve``: embedding + search over HTTP on 127.0.0.1 (loopback only).

Example:
    clipkit serve --model runs/coco/export --index /tmp/coco_index --port 8000
    # then open http://127.0.0.1:8000/ (search page) or /docs (OpenAPI)

Limits (README "Embed, index, serve"; :class:`clipkit.embed.limits.ServeLimits`): request bodies
and image decoding share ``--memory-budget-mb`` (a quarter for bodies, the rest for decoding,
reserved before the work); ``Host`` must be a loopback name or one given with ``--allow-host``;
slow clients are cut off by ``--header-timeout`` / ``--body-timeout`` / ``--keep-alive``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clipkit.embed.limits import ServeLimits

HOST = "127.0.0.1"  # never another address: the service has no authentication


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clipkit serve``."""
    parser.add_argument("--model", required=True, help="run, export, HF or ONNX dir, open_clip:X")
    parser.add_argument("--weights", default=None, help="weights file for open_clip:ARCH")
    parser.add_argument("--index", default=None, help="index folder from clipkit index")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-k", type=int, default=100)
    parser.add_argument("--max-body-mb", type=float, default=16.0)
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="per image")
    parser.add_argument(
        "--memory-budget-mb",
        type=float,
        default=1024.0,
        help="request bodies + image decoding held at once, all requests together (the model "
        "comes on top)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also serve this Host name (repeatable; '*' serves any); default: localhost, "
        "127.0.0.1, [::1]",
    )
    parser.add_argument("--header-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--body-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument("--keep-alive", type=float, default=5.0, help="idle seconds")
    parser.add_argument(
        "--data-root",
        default=None,
        help="answers show paths relative to this folder (default: the index's image folder)",
    )
    parser.add_argument(
        "--absolute-paths", action="store_true", help="answers show server paths as stored"
    )


def limits_from_args(args: argparse.Namespace) -> ServeLimits:
    """The service's limits from the flags.

    Raises:
        ValueError: a limit out of range, or a budget too small for the body/pixel limits.
    """
    from clipkit.embed.limits import LOOPBACK_HOSTS, ServeLimits

    try:
        return ServeLimits(
            max_body_bytes=int(args.max_body_mb * 2**20),
            max_pixels=args.max_pixels,
            max_k=args.max_k,
            memory_budget_bytes=int(args.memory_budget_mb * 2**20),
            allowed_hosts=(*LOOPBACK_HOSTS, HOST, *args.allow_host),
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            keep_alive_s=args.keep_alive,
            data_root=args.data_root,
            absolute_paths=args.absolute_paths,
        )
    except ValueError as err:  # name the flag the user typed, not the field
        msg = str(err)
        for name, flag in _FLAGS.items():
            msg = msg.replace(name, flag)
        raise ValueError(msg) from None


_FLAGS = {
    "max_body_bytes": "--max-body-mb",
    "max_pixels": "--max-pixels",
    "max_k": "--max-k",
    "header_timeout_s": "--header-timeout",
    "body_timeout_s": "--body-timeout",
    "keep_alive_s": "--keep-alive",
    "memory_budget_bytes": "--memory-budget-mb",
}


def run(args: argparse.Namespace) -> int:
    """Load the model and index, then serve until interrupted."""
    import uvicorn

    from clipkit.embed.app import create_app
    from clipkit.embed.catalog import Catalog
    from clipkit.embed.embedder import Embedder
    from clipkit.embed.server import server_config

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    limits = limits_from_args(args)  # before loading anything: a bad flag fails at once
    emb = Embedder.load(args.model, args.weights, device=args.device)
    catalog = Catalog.load(args.index) if args.index else None
    try:  # one query at a time gains nothing from OpenMP threads; concurrent requests would fight
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    app = create_app(emb, catalog, limits)
    uvicorn.Server(server_config(app, HOST, args.port, limits)).run()
    return 0
