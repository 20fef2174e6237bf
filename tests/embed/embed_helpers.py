"""Helpers shared by the embedding tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` random RGB images of varied sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 7 * (i % 5), 50 + 11 * (i % 3)
        out.append(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    return out


def png_bytes(img: Image.Image) -> bytes:
    """``img`` encoded as PNG."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_catalog_dir(embedder, tmp_path, n: int = 12):
    """An image folder with captions, embedded and indexed; returns (folder, index dir)."""
    from clipkit.cli import main
    from clipkit.embed.dataset import embed_dataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(make_images(n, seed=11)):
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"random picture {i}")
    embed_dataset(embedder, str(folder), tmp_path / "emb", progress=False)
    ix = tmp_path / "ix"
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(ix)]) == 0
    return folder, ix


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-extensions",
    "--no-first-run",
]
