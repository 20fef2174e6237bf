"""``clipkit serve``: embedding + search over HTTP on 127.0.0.1 (loopback only).

Example:
    clipkit serve --model runs/coco/export --index /tmp/coco_index --port 8000
    # then open http://127.0.0.1:8000/ (search page) or /docs (OpenAPI)
"""

from __future__ import annotations

import argparse

HOST = "127.0.0.1"  # never another address: the service has no authentication


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clipkit serve``."""
    parser.add_argument("--model", required=True, help="export dir, run dir or open_clip:ARCH")
    parser.add_argument("--weights", default=None, help="weights file for open_clip:ARCH")
    parser.add_argument("--index", default=None, help="index folder from clipkit index")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-k", type=int, default=100)
    parser.add_argument("--max-body-mb", type=float, default=16.0)
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096)


def run(args: argparse.Namespace) -> int:
    """Load the model and index, then serve until interrupted."""
    import uvicorn

    from clipkit.embed.app import ServeLimits, create_app
    from clipkit.embed.catalog import Catalog
    from clipkit.embed.embedder import Embedder

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    emb = Embedder.load(args.model, args.weights, device=args.device)
    catalog = Catalog.load(args.index) if args.index else None
    try:  # one query at a time gains nothing from OpenMP threads; concurrent requests would fight
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    limits = ServeLimits(
        max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels, max_k=args.max_k
    )
    uvicorn.run(create_app(emb, catalog, limits), host=HOST, port=args.port, log_level="warning")
    return 0
