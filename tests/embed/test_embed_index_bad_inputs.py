"""``clipkit embed`` / ``clipkit index`` on bad outputs and bad index folders (issue 17): one line,
exit 2, found before the model is loaded or the vectors are read; no ``.tmp`` left behind."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from embed_helpers import make_images

import clipkit.embed.embedder as embedder_mod
from clipkit.cli import main
from clipkit.embed.dataset import embed_dataset
from clipkit.embed.index import Index


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


@pytest.fixture
def folder(tmp_path) -> Path:
    f = tmp_path / "imgs"
    f.mkdir()
    for i, im in enumerate(make_images(4, seed=3)):
        im.save(f / f"{i}.png")
    return f


@pytest.mark.parametrize("kind", ["file", "foreign_folder", "read_only", "parent_is_file"])
def test_embed_output_checked_before_the_model_loads(
    tiny_export, folder, tmp_path, capsys, monkeypatch, kind
):
    loads = []
    monkeypatch.setattr(embedder_mod.Embedder, "load", lambda *a, **k: loads.append(a))
    if kind == "file":
        out, needle = tmp_path / "out.json", "is a file, not a folder"
        out.write_text("{}")
    elif kind == "foreign_folder":
        out, needle = tmp_path / "work", "is not empty and holds no embeddings.json"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif kind == "read_only":
        out, needle = tmp_path / "emb", "is not writable: Read-only file system"
        monkeypatch.setattr("clipkit.train.outputs.tempfile.mkstemp", _read_only)
    else:
        (tmp_path / "f").write_text("")
        out, needle = tmp_path / "f" / "emb", "is a file, not a folder"
    args = ["embed", "--model", str(tiny_export), "--input", str(folder), "--output", str(out)]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert line.startswith("clipkit embed: error: --output") and needle in line, line
    assert loads == [] and not (tmp_path / "emb").exists() and not _leftovers(tmp_path)


def test_embed_write_failure_is_one_line_and_leaves_no_tmp(embedder, folder, tmp_path, monkeypatch):
    real = np.save

    def full(path, x):
        real(path, x[:1])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("clipkit.embed.dataset.np.save", full)
    with pytest.raises(ValueError, match="No space left on device") as info:
        embed_dataset(embedder, str(folder), tmp_path / "emb", progress=False)
    assert "\n" not in str(info.value) and str(tmp_path / "emb") in str(info.value)
    assert not _leftovers(tmp_path)


@pytest.fixture
def emb_dir(embedder, folder, tmp_path) -> Path:
    out = tmp_path / "emb"
    embed_dataset(embedder, str(folder), out, progress=False)
    return out


def test_ivfpq_on_too_few_vectors_is_one_line(emb_dir, tmp_path, capsys) -> None:
    ix = tmp_path / "ix"
    assert (
        main(["index", "--embeddings", str(emb_dir), "--output", str(ix), "--kind", "ivfpq"]) == 2
    )
    line = _one_error_line(capsys)
    assert "ivfpq needs at least 256 vectors" in line and "got 4" in line
    assert "--kind flat" in line and not ix.exists()
    x = np.random.default_rng(0).standard_normal((80, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="at least 256 vectors .* got 80"):
        Index.build(x / np.linalg.norm(x, axis=1, keepdims=True), kind="ivfpq")
    assert Index.build(x, kind="auto", memory_budget_gb=1e-9).kind == "hnsw"  # never ivfpq


def test_index_output_checked_before_vectors_are_read(emb_dir, tmp_path, capsys) -> None:
    (tmp_path / "ix").write_text("")
    assert main(["index", "--embeddings", str(emb_dir), "--output", str(tmp_path / "ix")]) == 2
    assert "--output" in _one_error_line(capsys)


INDEX_JSON_CASES = [
    ("", "not readable JSON"),
    ("[]", "want a JSON object, found a JSON list"),
    ('{"dim": 256}', "missing key 'kind'"),
    ('{"kind": "flat"}', "missing key 'dim'"),
    ('{"kind": "annoy", "dim": 256}', "'kind' is 'annoy'; valid: flat, hnsw, ivfpq"),
    ('{"kind": "flat", "dim": "256"}', "'dim' must be a positive integer"),
    ('{"kind": "flat", "dim": 7}', "says dim 7, but index.faiss holds 256-d vectors"),
    ('{"kind": "flat", "dim": 256, "model": []}', "'model' must be an object"),
]


@pytest.mark.parametrize(("content", "needle"), INDEX_JSON_CASES)
def test_wrong_index_json_is_one_line(emb_dir, tmp_path, capsys, content, needle) -> None:
    ix = tmp_path / "ix"
    assert main(["index", "--embeddings", str(emb_dir), "--output", str(ix)]) == 0
    capsys.readouterr()
    (ix / "index.json").write_text(content)
    assert main(["index", "--embeddings", str(emb_dir), "--output", str(ix), "--add"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("clipkit index: error: ") and needle in line, line
    assert str(ix) in line


def test_corrupt_index_faiss_is_one_line(emb_dir, tmp_path, capsys) -> None:
    ix = tmp_path / "ix"
    assert main(["index", "--embeddings", str(emb_dir), "--output", str(ix)]) == 0
    capsys.readouterr()
    (ix / "index.faiss").write_bytes((ix / "index.faiss").read_bytes()[:40])
    with pytest.raises(ValueError, match=r"index\.faiss: not a readable faiss index") as info:
        Index.load(ix)
    assert "\n" not in str(info.value)


def test_corrupt_embeddings_manifest_is_one_line(emb_dir, tmp_path, capsys) -> None:
    (emb_dir / "embeddings.json").write_text(json.dumps({"partitions": {}}))
    assert main(["index", "--embeddings", str(emb_dir), "--output", str(tmp_path / "ix")]) == 2
    line = _one_error_line(capsys)
    assert "embeddings.json: not an embeddings manifest (missing key 'model')" in line
