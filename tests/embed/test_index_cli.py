"""clipkit index: build, audit, incremental --add, model check; Catalog search with metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from embed_helpers import make_images

from clipkit.cli import main
from clipkit.embed import Embedder
from clipkit.embed.catalog import Catalog
from clipkit.embed.dataset import embed_dataset


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_build_add_audit_and_search(embedder, tmp_path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(make_images(8, seed=5)):
        im.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"picture {i}")
    emb = tmp_path / "emb"
    embed_dataset(embedder, str(folder), emb, partition_size=3, progress=False)
    # Pretend the last partition was not there yet when the index was first built.
    man = json.loads((emb / "embeddings.json").read_text())
    last = man["partitions"].pop("2")
    (emb / "embeddings.json").write_text(json.dumps(man))
    ix = tmp_path / "ix"
    assert main(["index", "--embeddings", str(emb), "--output", str(ix), "--audit", "5"]) == 0
    s = _last_json(capsys)
    assert s["kind"] == "flat" and s["ntotal"] == 6 and s["recall@10"] == 1.0
    assert main(["index", "--embeddings", str(emb), "--output", str(ix)]) == 2
    assert "pass --add" in capsys.readouterr().err
    embed_dataset(embedder, str(folder), emb, partition_size=3, progress=False)
    assert main(["index", "--embeddings", str(emb), "--output", str(ix), "--add"]) == 0
    s = _last_json(capsys)
    assert s["added"] == last["kept"] == 2 and s["ntotal"] == 8

    cat = Catalog.load(ix)
    q = embedder.encode_image([folder / "05.png"])  # (1, D)
    hits = cat.search(q, k=3, model_id=embedder.model_id)[0]
    assert hits[0]["id"] == 5 and hits[0]["caption"] == "picture 5" and hits[0]["key"] == "05"
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    other = Embedder.load("open_clip:clipkit-tiny")
    with pytest.raises(ValueError, match="another model|this index holds"):
        cat.search(other.encode_text(["x"]), k=3, model_id=other.model_id)

    emb2 = tmp_path / "emb2"
    embed_dataset(other, str(folder), emb2, progress=False)
    assert main(["index", "--embeddings", str(emb2), "--output", str(ix), "--add"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this index holds vectors of model" in err[0]


def test_hnsw_kind_by_flag(embedder, tmp_path, capsys) -> None:
    txt = tmp_path / "lines.txt"
    txt.write_text("\n".join(f"sentence number {i}" for i in range(50)))
    embed_dataset(embedder, str(txt), tmp_path / "e", progress=False)
    args = ["index", "--embeddings", str(tmp_path / "e"), "--output", str(tmp_path / "i")]
    assert main([*args, "--modality", "text", "--kind", "hnsw", "--audit", "20"]) == 0
    s = _last_json(capsys)
    assert s["kind"] == "hnsw" and s["recall@10"] >= 0.9
    hits = Catalog.load(tmp_path / "i").search(embedder.encode_text(["sentence number 7"]), k=1)
    assert hits[0][0]["caption"] == "sentence number 7"
    np.testing.assert_allclose(hits[0][0]["score"], 1.0, atol=2e-3)
