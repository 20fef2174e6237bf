"""Service under load on loopback: concurrent clients, mixed requests, latency percentiles.

Starts ``clipkit serve`` as a subprocess on 127.0.0.1, then ``--clients`` threads send
``--requests`` requests in all, cycling embed-text / search-by-text / search-by-image (a COCO-mini
JPEG, base64), and reports errors, p50/p99 per kind and the server's peak RSS. Run:
    flock /tmp/clipkit-bench.lock python bench/serve_load.py --model RUN_OR_EXPORT --index INDEX_DIR
(make INDEX_DIR with ``clipkit embed`` + ``clipkit index``; see bench/README.md).
"""

from __future__ import annotations

import argparse
import base64
import csv
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mib(pid: int) -> str:
    """The server's peak RSS (Linux ``VmHWM``), or "?" where the kernel does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 1024:.0f}"
    except OSError:
        pass
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    a = ap.parse_args()
    root = Path(os.environ.get("CLIPKIT_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    coco = root / "coco_mini"
    caps = [r["title"] for r in csv.DictReader((coco / "captions.tsv").open(), delimiter="\t")]
    imgs = [base64.b64encode(p.read_bytes()).decode() for p in sorted(coco.glob("train2017/*.jpg"))]
    port = free_port()
    cmd = [sys.executable, "-m", "clipkit.cli", "serve", "--model", a.model, "--index", a.index]
    server = subprocess.Popen([*cmd, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("server did not start")
            time.sleep(0.2)

        def one(i: int) -> tuple[str, float, int]:
            kind = ("embed_text", "search_text", "search_image")[i % 3]
            if kind == "embed_text":
                path, body = "/embed/text", {"texts": [caps[i % len(caps)]]}
            elif kind == "search_text":
                path, body = "/search", {"text": caps[(7 * i) % len(caps)], "k": 10}
            else:
                path, body = "/search", {"image": imgs[i % len(imgs)], "k": 10}
            t = time.perf_counter()
            try:
                r = client.post(url + path, json=body, timeout=120)
                code = r.status_code
            except httpx.TransportError:
                code = -1
            return kind, 1000 * (time.perf_counter() - t), code

        limits = httpx.Limits(max_connections=a.clients)
        with httpx.Client(limits=limits) as client, ThreadPoolExecutor(a.clients) as pool:
            t0 = time.perf_counter()
            res = list(pool.map(one, range(a.requests)))
            wall = time.perf_counter() - t0
        healthy = httpx.get(url + "/health", timeout=5).json()
        peak_mib = _peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    errors = sum(c != 200 for _, _, c in res)
    print(
        f"{a.clients} clients, {a.requests} requests in {wall:.1f} s "
        f"({a.requests / wall:.1f} req/s), errors {errors}, health after: {healthy}, "
        f"server peak RSS {peak_mib} MiB"
    )
    print("| kind | n | p50 ms | p99 ms |\n|---|---|---|---|")
    for kind in ("embed_text", "search_text", "search_image", "all"):
        lat = np.array([ms for k, ms, _ in res if kind in (k, "all")])
        print(
            f"| {kind} | {len(lat)} | {np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} |"
        )


if __name__ == "__main__":
    main()
