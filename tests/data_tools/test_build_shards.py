"""build_shards on the real inputs (COCO-mini TSV + JSON, CIFAR-10 tar) and on broken inputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_tools.build_shards import build
from data_tools.build_shards import main as build_main
from data_tools.verify import main as verify_main


def _read_samples(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.mark.parametrize(
    "relpath", ["coco_mini/captions.tsv", "coco_mini/annotations/captions_train2017.json"]
)
def test_coco_mini_both_formats_give_80_images_400_captions(data_root, tmp_path, relpath):
    out = tmp_path / "shards"
    assert (
        build_main([str(data_root / relpath), str(out), "--shard-size", "30", "--workers", "2"])
        == 0
    )
    stats = json.loads((out / "_stats.json").read_text())
    assert (stats["count"], stats["captions"], stats["shards"], stats["failed"]) == (80, 400, 3, 0)
    assert json.loads((out / "sizes.json").read_text()) == {
        "00000.tar": 30,
        "00001.tar": 30,
        "00002.tar": 20,
    }
    samples = _read_samples(out)
    assert len(samples) == 80 and len({s["__key__"] for s in samples}) == 80
    for s in samples:
        caps = json.loads(s["json"])["captions"]
        assert len(caps) == 5 and s["txt"].decode().split("\n") == caps
        assert "cls" not in s
    assert verify_main([str(out), "--workers", "1"]) == 0


def test_same_captions_from_tsv_and_json(data_root, tmp_path):
    by_file = {}
    for rel in ("coco_mini/captions.tsv", "coco_mini/annotations/captions_train2017.json"):
        out = tmp_path / Path(rel).suffix[1:]
        build(data_root / rel, out, workers=1, progress=False)
        for s in _read_samples(out):
            name = Path(json.loads(s["json"])["source"]).name
            by_file.setdefault(name, []).append(sorted(s["txt"].decode().split("\n")))
    assert len(by_file) == 80 and all(a == b for a, b in by_file.values())


def _folder(root: Path, photo: Path) -> None:
    img = Image.open(photo).convert("RGB")
    for c, name in enumerate(["cat", "dog", "tabby_cat"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            img.resize((40 + 10 * i + c, 30 + 5 * i)).save(root / name / f"{i}.jpg")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    data = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(data[:40])
    Image.new("RGBA", (50, 20), (0, 0, 255, 128)).save(root / "dog" / "alpha.png")
    Image.new("RGB", (900, 300), "red").save(root / "tabby_cat" / "big.bmp")


def test_image_folder_labels_skips_and_reencode(data_root, tmp_path):
    photo = sorted((data_root / "coco_mini" / "train2017").glob("*.jpg"))[0]
    _folder(tmp_path / "in", photo)
    out = tmp_path / "out"
    st = build(tmp_path / "in", out, shard_size=5, max_side=256, workers=2, progress=False)
    assert st["classes"] == ["cat", "dog", "tabby_cat"]
    assert st["count"] == 14 and st["failed"] == 2  # 12 + alpha.png + big.bmp
    assert sorted(Path(f["source"]).name for f in st["failures"]) == ["broken.jpg", "truncated.jpg"]
    samples = _read_samples(out)
    by_cls = {}
    for s in samples:
        meta = json.loads(s["json"])
        by_cls.setdefault(int(s["cls"]), set()).add(s["txt"].decode())
        assert meta["label"] == int(s["cls"])
        if Path(meta["source"]).name == "big.bmp":  # not a kept format + too big: re-encoded
            assert "jpg" in s and (meta["width"], meta["original_width"]) == (256, 900)
        if Path(meta["source"]).name == "alpha.png":
            assert "png" in s  # small PNG keeps its bytes
    assert by_cls == {0: {"cat"}, 1: {"dog"}, 2: {"tabby cat"}}
    assert verify_main([str(out), "--workers", "1"]) == 0


def test_tar_of_image_folder(data_root, tmp_path):
    photo = sorted((data_root / "coco_mini" / "train2017").glob("*.jpg"))[1]
    _folder(tmp_path / "tree", photo)
    with tarfile.open(tmp_path / "tree.tar", "w") as tf:
        tf.add(tmp_path / "tree", arcname=".")
    st = build(tmp_path / "tree.tar", tmp_path / "out", shard_size=4, workers=2, progress=False)
    assert (st["count"], st["failed"], st["shards"]) == (14, 2, 4)
    assert {json.loads(s["json"])["classname"] for s in _read_samples(tmp_path / "out")} == {
        "cat",
        "dog",
        "tabby_cat",
    }


def test_bad_input_is_one_line_error(tmp_path, capsys):
    assert build_main([str(tmp_path / "missing.tsv"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "input not found" in err
    (tmp_path / "t.tsv").write_text("name\tcaption\nx.jpg\thello\n")
    assert build_main([str(tmp_path / "t.tsv"), str(tmp_path / "o")]) == 2
    assert "no image path column" in capsys.readouterr().err


def test_refuses_to_overwrite_without_flag(data_root, tmp_path):
    src = data_root / "coco_mini" / "captions.tsv"
    build(src, tmp_path, workers=1, progress=False)
    with pytest.raises(ValueError, match="--overwrite"):
        build(src, tmp_path, workers=1, progress=False)
    assert build(src, tmp_path, workers=1, progress=False, overwrite=True)["count"] == 80


@pytest.mark.slow
def test_cifar10_test_tar_gives_10000_labelled_samples(data_root, tmp_path):
    out = tmp_path / "cifar"
    st = build(data_root / "cifar10" / "test.tar", out, workers=2, progress=False)
    assert (st["count"], st["shards"], st["failed"], len(st["classes"])) == (10000, 10, 0, 10)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 10000
    first = next(iter(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False)))
    assert json.loads(first["json"])["classname"] == st["classes"][int(first["cls"])]
    img = Image.open(io.BytesIO(first["jpg"]))
    assert img.size == (32, 32)
