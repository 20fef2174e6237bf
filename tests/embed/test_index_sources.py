"""clipkit index --add with several embedding folders: id offsets per source, nothing dropped."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from clipkit.cli import main
from clipkit.embed.catalog import Catalog
from clipkit.embed.dataset import embed_dataset, load_embeddings


def _embed(embedder, tmp_path, name: str, lines: list[str], part: int, cut: bool = False):
    """Embed ``lines`` into ``tmp_path/name``; ``cut`` drops the last partition (a crash)."""
    src, out = tmp_path / f"{name}.txt", tmp_path / name
    src.write_text("".join(f"{t}\n" for t in lines))
    man = embed_dataset(embedder, str(src), out, partition_size=part, progress=False)
    if cut:
        last = str(len(man["partitions"]) - 1)
        (out / "metadata" / f"metadata_{last}.parquet").unlink()
        man["partitions"].pop(last)
        man["complete"] = False
        (out / "embeddings.json").write_text(json.dumps(man))
    return src, out


def _index(ix, emb, *flags: str) -> list[str]:
    return ["index", "--embeddings", str(emb), "--output", str(ix), "--modality", "text", *flags]


def _run(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _fail(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_second_source_gets_offset_and_resume_adds_only_new(embedder, tmp_path, capsys) -> None:
    a_lines = [f"alpha sentence {i}" for i in range(6)]
    b_lines = [f"beta line about boats {i}" for i in range(5)]
    _, a = _embed(embedder, tmp_path, "a", a_lines, part=4)
    b_src, b = _embed(embedder, tmp_path, "b", b_lines, part=2, cut=True)  # 4 of 5 done
    ix = tmp_path / "ix"
    s = _run(capsys, _index(ix, a))
    assert (s["ntotal"], s["added"], s["id_offset"]) == (6, 6, 0)
    s = _run(capsys, _index(ix, b, "--add"))
    assert (s["ntotal"], s["added"], s["id_offset"], s["sources"]) == (10, 4, 6, 2)
    s = _run(capsys, _index(ix, b, "--add"))  # nothing new
    assert (s["ntotal"], s["added"], s["id_offset"]) == (10, 0, 6)
    embed_dataset(embedder, str(b_src), b, partition_size=2, progress=False)  # resumes: +1
    s = _run(capsys, _index(ix, b, "--add", "--audit", "5"))
    assert (s["ntotal"], s["added"], s["id_offset"], s["recall@10"]) == (11, 1, 6, 1.0)

    cat = Catalog.load(ix)
    ids = cat.index.ids()
    assert sorted(ids.tolist()) == list(range(11)) and len(cat.metadata) == 11
    assert cat.metadata["id"].is_unique and set(cat.metadata["id"]) == set(ids.tolist())
    bx, bmeta, _ = load_embeddings(b, "text")
    for local in (0, 4):  # the first vector and the one added after the resume
        hit = cat.search(bx[local : local + 1].astype(np.float32), k=1)[0][0]
        assert hit["id"] == 6 + local and hit["caption"] == b_lines[local]
        assert hit["source_id"] == local and hit["source_dir"] == str(b.resolve())
        assert hit["score"] == pytest.approx(1.0, abs=2e-3)
    ax, _, _ = load_embeddings(a, "text")
    hit = cat.search(ax[2:3].astype(np.float32), k=1)[0][0]
    assert (hit["id"], hit["caption"], hit["source_dir"]) == (2, a_lines[2], str(a.resolve()))

    err = _fail(capsys, _index(ix, b, "--add", "--id-offset", "50"))
    assert "already indexed with offset 6" in err
    b_src.write_text("".join(f"{t}\n" for t in reversed(b_lines)))
    embed_dataset(embedder, str(b_src), b, partition_size=2, progress=False, overwrite=True)
    err = _fail(capsys, _index(ix, b, "--add"))
    assert "re-embedded from a changed input" in err and str(b) in err


def test_explicit_offset_and_collisions(embedder, tmp_path, capsys) -> None:
    _, a = _embed(embedder, tmp_path, "a", [f"a {i}" for i in range(6)], part=2, cut=True)
    _, c = _embed(embedder, tmp_path, "c", [f"c {i}" for i in range(3)], part=10)
    _, d = _embed(embedder, tmp_path, "d", [f"d {i}" for i in range(2)], part=10)
    ix = tmp_path / "ix"
    assert _run(capsys, _index(ix, a))["ntotal"] == 4  # ids 0..3; A's run was cut short
    err = _fail(capsys, _index(ix, c, "--add", "--id-offset", "2"))
    assert "2 ids collide" in err and "(e.g. 2)" in err and str(a.resolve()) in err
    s = _run(capsys, _index(ix, c, "--add", "--id-offset", "100"))
    assert (s["added"], s["id_offset"]) == (3, 100)
    s = _run(capsys, _index(ix, d, "--add"))
    assert (s["added"], s["id_offset"], s["ntotal"]) == (2, 103, 9)
    err = _fail(capsys, _index(ix, d, "--add", "--id-offset", "7"))
    assert "already indexed with offset 103" in err  # a known source keeps its offset
    _, e = _embed(embedder, tmp_path, "e", ["e"], part=10)
    assert "must be >= 0" in _fail(capsys, _index(ix, e, "--add", "--id-offset", "-1"))
    # F takes ids 4 and 5 right after A, whose run was cut short; then A resumes and grows.
    _, f = _embed(embedder, tmp_path, "f", ["f 0", "f 1"], part=10)
    assert _run(capsys, _index(ix, f, "--add", "--id-offset", "4"))["id_offset"] == 4
    embed_dataset(embedder, str(tmp_path / "a.txt"), a, partition_size=2, progress=False)
    err = _fail(capsys, _index(ix, a, "--add"))  # A grew into F's ids: refused, not dropped
    assert "with id offset 0, 2 ids collide" in err and str(f.resolve()) in err
    assert len(Catalog.load(ix).index) == 11


def test_index_from_before_offsets(embedder, tmp_path, capsys) -> None:
    _, a = _embed(embedder, tmp_path, "a", [f"a {i}" for i in range(5)], part=2, cut=True)
    ix = tmp_path / "ix"
    _run(capsys, _index(ix, a))
    info = json.loads((ix / "index.json").read_text())  # rewrite as the old CLI wrote it
    info["info"]["sources"] = [str(a)]
    (ix / "index.json").write_text(json.dumps(info))
    meta = pd.read_parquet(ix / "metadata.parquet").drop(columns=["source_dir", "source_id"])
    meta.to_parquet(ix / "metadata.parquet", index=False)
    embed_dataset(embedder, str(tmp_path / "a.txt"), a, partition_size=2, progress=False)
    s = _run(capsys, _index(ix, a, "--add"))
    assert (s["added"], s["id_offset"], s["ntotal"]) == (1, 0, 5)
    _, b = _embed(embedder, tmp_path, "b", ["b 0", "b 1"], part=10)
    s = _run(capsys, _index(ix, b, "--add"))
    assert (s["added"], s["id_offset"], s["ntotal"]) == (2, 5, 7)
    cat = Catalog.load(ix)
    assert cat.row(0)["source_dir"] == str(a.resolve()) and cat.row(6)["source_id"] == 1
