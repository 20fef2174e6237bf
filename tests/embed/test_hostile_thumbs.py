"""``GET /image/{id}`` over indexes of ImageFolder tars, whole and damaged (issue 17): every
indexed member is served with its own bytes; a member cut off or overwritten after indexing is a
410 with one JSON line, never a 500."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from cifar_cuts import cut_imagefolder_tar
from fastapi.testclient import TestClient

from clipkit.cli import main
from clipkit.embed.app import create_app
from clipkit.embed.catalog import Catalog


def _index(tar: Path, model: Path, out: Path) -> Path:
    assert main(["embed", "--model", str(model), "--input", str(tar), "--output", str(out)]) == 0
    assert main(["index", "--embeddings", str(out), "--output", str(out / "index")]) == 0
    return out / "index"


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {
            m.name.removeprefix("./").rsplit(".", 1)[0]: t.extractfile(m).read()
            for m in t
            if m.isfile()
        }


@pytest.fixture(scope="module")
def cifar_tar(data_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("thumbs")
    return cut_imagefolder_tar(data_root / "cifar10" / "test.tar", out / "c.tar", per_class=2)


def _client(embedder, ix: Path) -> TestClient:
    app = create_app(embedder, Catalog.load(ix))
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def test_imagefolder_tar_thumbnails(embedder, tiny_export, cifar_tar, tmp_path) -> None:
    ix = _index(cifar_tar, tiny_export, tmp_path / "emb")
    client = _client(embedder, ix)
    members, cat = _members(cifar_tar), Catalog.load(ix)
    assert len(cat.index) == len(members) == 20
    for i in range(20):
        r = client.get(f"/image/{i}")
        assert r.status_code == 200, (i, r.text)
        assert r.content == members[cat.row(i)["key"]]  # key bird/0014 <- member ./bird/0014.jpg
        assert r.headers["content-type"] == "image/jpeg"
    r = client.get("/image/20")
    assert r.status_code == 404 and "no image stored" in r.json()["detail"]


def test_damaged_tar_thumbnails_are_410(embedder, tiny_export, cifar_tar, tmp_path) -> None:
    tar = tmp_path / "c.tar"
    data = cifar_tar.read_bytes()
    tar.write_bytes(data[: len(data) * 2 // 3])  # cut mid-file: the index keeps what it read
    ix = _index(tar, tiny_export, tmp_path / "emb")
    client, cat = _client(embedder, ix), Catalog.load(ix)
    n = len(cat.index)
    assert 0 < n < 20
    assert [client.get(f"/image/{i}").status_code for i in range(n)] == [200] * n

    tar.write_bytes(data[: len(data) // 3])  # cut again after indexing: members lost
    codes = [client.get(f"/image/{i}").status_code for i in range(n)]
    assert set(codes) == {200, 410} and codes == sorted(codes), codes
    lost = client.get(f"/image/{n - 1}")
    detail = lost.json()["detail"]
    assert "\n" not in detail and "c.tar#" in detail and str(tmp_path) not in detail, detail

    # Garbage over the first member's data (after its 512-byte header): not an image any more.
    with tarfile.open(cifar_tar) as t:
        first = next(m for m in t if m.isfile())
    broken = bytearray(data)
    broken[first.offset_data : first.offset_data + 64] = b"\0" * 64
    tar.write_bytes(bytes(broken))
    r = client.get("/image/0")
    assert r.status_code == 410 and "not a readable image" in json.loads(r.text)["detail"]
    assert client.get("/image/1").status_code == 200

    tar.unlink()  # the whole tar gone
    r = client.get("/image/1")
    assert r.status_code == 410 and "no longer there" in r.json()["detail"]
    assert client.get("/health").json() == {"status": "ok"}
