"""The search page in headless Chromium (Debian's, via Playwright): type, upload, see the grid.

The end-to-end test trains clipkit-tiny for a few steps on COCO-mini shards, embeds the COCO images,
builds the index, serves it and searches by one of the COCO captions; it saves a screenshot.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from embed_helpers import CHROMIUM, CHROMIUM_ARGS, LiveServer, build_catalog_dir

from clipkit.cli import main
from clipkit.embed import Embedder
from clipkit.embed.app import create_app
from clipkit.embed.catalog import Catalog

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def _grid_state(page) -> list[dict]:
    return page.eval_on_selector_all(
        ".result",
        """els => els.map(e => ({id: Number(e.dataset.id),
            caption: e.querySelector('.caption').textContent,
            score: Number(e.querySelector('.score').textContent),
            loaded: e.querySelector('img').complete
                    && e.querySelector('img').naturalWidth > 0}))""",
    )


def test_type_query_and_upload_image(embedder, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    folder, ix = build_catalog_dir(embedder, tmp_path)
    with LiveServer(create_app(embedder, Catalog.load(ix))) as srv, sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.fill("#k", "5")
        page.fill("#q", "random picture 3")
        page.press("#q", "Enter")
        page.wait_for_function("document.querySelectorAll('.result').length === 5")
        page.wait_for_function(
            "[...document.querySelectorAll('.result img')].every(i => i.complete)"
        )
        hits = _grid_state(page)
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(h["loaded"] and h["caption"].startswith("random picture") for h in hits)
        assert "5 results" in page.text_content("#status")
        page.set_input_files("#file", str(folder / "09.png"))
        page.wait_for_function("document.querySelector('.result').dataset.id === '9'")
        assert _grid_state(page)[0]["caption"] == "random picture 9"
        page.fill("#k", "500")  # out of range: the page shows the server's message
        page.press("#q", "Enter")
        page.wait_for_selector("#status.error")
        assert "k: must be an integer" in page.text_content("#status")
        browser.close()


def _coco_shard(root: Path, out: Path) -> Path:
    import webdataset as wds

    rows = list(csv.DictReader((root / "captions.tsv").open(), delimiter="\t"))
    with wds.TarWriter(str(out)) as w:
        for i, r in enumerate(rows):
            w.write(
                {
                    "__key__": f"{i:05d}",
                    "jpg": (root / r["filepath"]).read_bytes(),
                    "txt": r["title"],
                }
            )
    return out


@pytest.mark.slow
def test_end_to_end_coco_mini(data_root, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    coco = data_root / "coco_mini"
    shard = _coco_shard(coco, tmp_path / "coco-000.tar")
    run = tmp_path / "run"
    train_args = [
        "train", "model.name=clipkit-tiny", "data.builtin=", f"data.train={shard}",
        "data.num_samples=400", "data.workers=0", "train.batch_size=8", "train.max_steps=2",
        f"train.output_dir={run}", "train.trackers=[]", "train.torch_threads=2",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    assert main(train_args) == 0
    emb_dir, ix = tmp_path / "emb", tmp_path / "ix"
    caps = coco / "captions.tsv"
    assert main(["embed", "--model", str(run), "--input", str(caps), "--output", str(emb_dir)]) == 0
    assert main(["index", "--embeddings", str(emb_dir), "--output", str(ix), "--audit", "20"]) == 0
    embedder = Embedder.load(run)
    catalog = Catalog.load(ix)
    assert len(catalog.index) == 80
    query = next(csv.DictReader(caps.open(), delimiter="\t"))["title"]
    with LiveServer(create_app(embedder, catalog)) as srv, sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(srv.url + "/")
        page.fill("#q", query)
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('.result').length === 12")
        page.wait_for_function(
            "[...document.querySelectorAll('.result img')].every(i => i.complete)"
        )
        hits = _grid_state(page)
        assert all(h["loaded"] for h in hits)  # real COCO photos served from the index's paths
        assert len({h["id"] for h in hits}) == 12
        shot = Path(os.environ.get("CLIPKIT_SCREENSHOT_DIR", tmp_path)) / "coco_search.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000  # a rendered grid of photos, not a blank page
