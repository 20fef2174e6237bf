"""The one input layer: detection of every kind, expansion, order, damage counted, fingerprint."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from tar_helpers import write_plain_tar

from clipkit.data.sources import (
    TarStats,
    detect_kind,
    expand_shards,
    fingerprint,
    image_bytes,
    iter_records,
    open_source,
    read_tar_image,
)
from clipkit.data.tables import CAPTION_COLUMNS, PATH_COLUMNS
from clipkit.data.tarscan import scan_tar


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def _tree(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i:02d}.jpg").write_bytes(_jpeg(10 * i))
    return root


def _tree_tar(path: Path, per_class: int = 20) -> Path:
    members = [(f"./{c}/{i:03d}.jpg", _jpeg(i)) for c in ("cat", "dog") for i in range(per_class)]
    write_plain_tar(path, members)
    return path


def _shard(path: Path, n: int, second: str = "cls", start: int = 0) -> Path:
    members = []
    for i in range(start, start + n):
        members += [(f"k{i:03d}.jpg", _jpeg(i)), (f"k{i:03d}.{second}", str(i % 2).encode())]
    write_plain_tar(path, members)
    return path


def test_every_kind_is_detected(tmp_path) -> None:
    tree = _tree(tmp_path / "tree")
    _tree_tar(tmp_path / "tree.tar")
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        _shard(shards / f"{s}.tar", 2, start=2 * s)
    bench = tmp_path / "cb"
    (bench / "test").mkdir(parents=True)
    (bench / "classnames.txt").write_text("even\nodd\n")
    (bench / "test" / "nshards.txt").write_text("1\n")
    _shard(bench / "test" / "0.tar", 2)
    (tmp_path / "c.tsv").write_text("filepath\ttitle\ntree/cat/00.jpg\ta cat\n")
    (tmp_path / "c.csv").write_text("image,caption\ntree/cat/00.jpg,a cat\n")
    (tmp_path / "coco.json").write_text('{"images": [], "annotations": []}')
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(_jpeg(1))
    (tmp_path / "s.txt").write_text("one\ntwo\n")
    kinds = {
        str(tree): "imagefolder",
        str(tmp_path / "tree.tar"): "imagefolder-tar",
        str(shards / "0.tar"): "shards",
        str(shards / "{0..2}.tar"): "shards",
        str(shards): "shards",
        f"{shards / '0.tar'}::{shards / '1.tar'}": "shards",
        str(bench): "clip-benchmark",
        str(tmp_path / "c.tsv"): "captions",
        str(tmp_path / "c.csv"): "captions",
        str(tmp_path / "coco.json"): "coco",
        str(imgs): "images",
        str(tmp_path / "s.txt"): "text",
    }
    assert {spec: detect_kind(spec) for spec in kinds} == kinds
    with pytest.raises(ValueError, match="not found"):
        detect_kind(str(tmp_path / "nope"))


def test_expansion_of_brace_folder_glob_and_joined_specs(tmp_path) -> None:
    for i in (0, 1, 2, 10):
        _shard(tmp_path / f"{i}.tar", 1)
    d = str(tmp_path)
    assert expand_shards(f"{d}/{{0..2}}.tar") == [f"{d}/{i}.tar" for i in (0, 1, 2)]
    assert expand_shards(d) == [f"{d}/{i}.tar" for i in (0, 1, 2, 10)]  # natural order
    assert expand_shards(f"{d}/0.tar::{d}/{{1..2}}.tar") == [f"{d}/{i}.tar" for i in (0, 1, 2)]
    assert expand_shards(f"{d}/1*.tar") == [f"{d}/1.tar", f"{d}/10.tar"]
    with pytest.raises(ValueError, match=r"shard not found: .*/3\.tar"):
        expand_shards(f"{d}/{{0..3}}.tar")


def test_imagefolder_dir_and_tar_give_the_same_records(tmp_path) -> None:
    tree = _tree(tmp_path / "tree")
    with tarfile.open(tmp_path / "tree.tar", "w") as tf:
        tf.add(tree, arcname=".")
    a, b = open_source(str(tree)), open_source(str(tmp_path / "tree.tar"))
    assert a.classes == b.classes == ["cat", "dog"]
    ra, rb = list(a.records()), list(b.records())
    assert (
        [r.key for r in ra]
        == [r.key for r in rb]
        == [f"{c}/{i:02d}" for c in ("cat", "dog") for i in range(3)]
    )
    assert [r.label for r in ra] == [r.label for r in rb] == [0, 0, 0, 1, 1, 1]
    assert [image_bytes(r.image) for r in ra] == [image_bytes(r.image) for r in rb]
    assert read_tar_image(str(tmp_path / "tree.tar"), "dog/01") == image_bytes(ra[4].image)


def test_clip_benchmark_layout_and_shard_records(tmp_path) -> None:
    bench = tmp_path / "cb"
    (bench / "test").mkdir(parents=True)
    (bench / "classnames.txt").write_text("even\nodd\n")
    (bench / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\n")
    (bench / "test" / "nshards.txt").write_text("2\n")
    _shard(bench / "test" / "0.tar", 2)
    _shard(bench / "test" / "1.tar", 2, second="cls", start=2)
    src = open_source(str(bench))
    assert src.classes == ["even", "odd"] and src.templates_file is not None
    recs = list(src.records())
    assert [(r.key, r.label) for r in recs] == [(f"k{i:03d}", i % 2) for i in range(4)]
    (bench / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(ValueError, match=r"shard not found: .*2\.tar"):
        open_source(str(bench))


def test_caption_rule_and_grouping(tmp_path) -> None:
    assert PATH_COLUMNS[0] == "filepath" and CAPTION_COLUMNS[0] == "title"  # open_clip's CSV keys
    (tmp_path / "t.tsv").write_text(
        "Caption\tfilepath\ttitle\n"
        "x0\ta/1.jpg\tone\nx1\tb.jpg\ttwo\nx2\ta/1.jpg\t three \nx3\tb.jpg\t\n"
    )
    recs = list(iter_records(str(tmp_path / "t.tsv")))
    assert [(r.key, r.captions) for r in recs] == [("a/1", ["one", "three"]), ("b", ["two"])]
    assert recs[0].image == str(tmp_path / "a" / "1.jpg")
    (tmp_path / "only.csv").write_text("text\nhello\n\nworld\n")
    assert [r.captions for r in iter_records(str(tmp_path / "only.csv"))] == [["hello"], ["world"]]
    (tmp_path / "s.txt").write_text("first\n\nthird\n")
    assert [r.captions for r in iter_records(str(tmp_path / "s.txt"))] == [
        ["first"],
        [""],
        ["third"],
    ]
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match=r"bad\.tsv: header .*title"):
        open_source(str(tmp_path / "bad.tsv"))


def test_coco_json_sorted_by_image_id(tmp_path) -> None:
    (tmp_path / "val").mkdir()
    for name in ("0.jpg", "1.jpg"):
        (tmp_path / "val" / name).write_bytes(_jpeg(3))
    (tmp_path / "ann").mkdir()
    coco = {
        "images": [{"id": 7, "file_name": "1.jpg"}, {"id": 3, "file_name": "0.jpg"}],
        "annotations": [
            {"image_id": 7, "caption": "x"},
            {"image_id": 3, "caption": "y"},
            {"image_id": 7, "caption": "z "},
        ],
    }
    (tmp_path / "ann" / "captions_val.json").write_text(json.dumps(coco))
    recs = list(iter_records(str(tmp_path / "ann" / "captions_val.json")))
    assert [(r.key, r.captions, r.meta["image_id"]) for r in recs] == [
        ("0", ["y"], 3),
        ("1", ["x", "z"], 7),
    ]


def test_image_folder_with_side_files(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.png", "sub/c.jpg"):
        (tmp_path / name).write_bytes(_jpeg(5))
    (tmp_path / "a.txt").write_text("first caption\nsecond\n")
    (tmp_path / "b.json").write_text('{"url": "http://x/b.jpg"}')
    recs = list(iter_records(str(tmp_path)))
    assert [r.key for r in recs] == ["a", "b", "sub/c"] and recs[0].label is None
    assert recs[0].captions == ["first caption", "second"] and recs[1].meta["url"].endswith("b.jpg")


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # random bytes over 4 KiB in the middle (members are 1.5 KiB, so a header is hit)
        mid = len(data) // 2
        data[mid : mid + 4096] = random.Random(0).randbytes(4096)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_imagefolder_tar_is_counted_not_silently_shortened(tmp_path, how, caplog) -> None:
    path = _tree_tar(tmp_path / "t.tar")
    _damage(path, how)
    stats = TarStats()
    with caplog.at_level(logging.WARNING):
        recs = list(iter_records(str(path), stats=stats))
    assert 0 < len(recs) < 40
    assert stats.skipped_shards == 1 and stats.problems[0].url == str(path)
    expected = "truncated" if how == "truncated" else "unreadable"
    assert stats.problems[0].kind == expected
    assert sum(str(path) in r.message for r in caplog.records) == 1  # one warning naming it


def test_cut_between_members_is_counted(tmp_path) -> None:
    members = [(f"./cat/{i}.jpg", _jpeg(i)) for i in range(4)]
    ends = write_plain_tar(tmp_path / "t.tar", members)
    (tmp_path / "t.tar").write_bytes((tmp_path / "t.tar").read_bytes()[: ends[1]])
    stats = TarStats()
    assert len(scan_tar(tmp_path / "t.tar", stats)) == 2
    assert stats.truncated_shards == 1 and "no end-of-archive marker" in str(stats.problems[0])


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_header_scan_matches_tarfile(tmp_path, fmt) -> None:
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90  # > 100 chars: long name
    names = ["./cat/0.jpg", f"./{long_dir}/1.png", "./dog/notes.txt", "./dog/é2.jpeg"]
    with tarfile.open(tmp_path / "t.tar", "w", format=fmt) as tf:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = _jpeg(i) * (i + 1)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "t.tar") as tf:
        ref = [(m.name.removeprefix("./"), m.offset_data, m.size) for m in tf if m.isfile()]
    stats = TarStats()
    got = [(m.name, m.offset, m.size) for m in scan_tar(tmp_path / "t.tar", stats)]
    assert got == ref and len(ref) == 4 and stats.skipped_shards == 0
    (tmp_path / "bad.tar").write_bytes(b"x" * 2048)
    with pytest.raises(ValueError, match="cannot read tar"):
        scan_tar(tmp_path / "bad.tar")


def test_fingerprint_changes_with_the_files(tmp_path) -> None:
    tree = _tree(tmp_path / "tree")
    a = fingerprint(str(tree))
    assert a["kind"] == "imagefolder" and a["files"] == 6
    assert fingerprint(str(tree)) == a
    (tree / "cat" / "00.txt").write_text("a side caption")
    assert fingerprint(str(tree))["files"] == 7
    (tmp_path / "c.tsv").write_text("filepath\ttitle\ntree/cat/00.jpg\ta\n")
    b = fingerprint(str(tmp_path / "c.tsv"))
    (tmp_path / "c.tsv").write_text("filepath\ttitle\ntree/cat/00.jpg\tb\n")
    assert fingerprint(str(tmp_path / "c.tsv"))["sha256"] != b["sha256"]


def test_one_tsv_gives_the_same_captions_in_eval_embed_and_data_tools(tmp_path) -> None:
    from clipkit.embed.sources import iter_records as embed_records
    from clipkit.eval.datasets import open_captions
    from data_tools.sources import read_input

    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(40 * i))
    # Both a caption and a title column: the one rule reads `title` (open_clip's default).
    (tmp_path / "c.tsv").write_text(
        "caption\tfilepath\ttitle\n"
        "c0\timg/1.jpg\tone\nc1\timg/0.jpg\tzero\nc2\timg/1.jpg\tuno\nc3\timg/2.jpg\ttwo\n"
    )
    want = [["one", "uno"], ["zero"], ["two"]]
    ds = open_captions(str(tmp_path / "c.tsv"), lambda im: im)
    assert [ds[i][1] for i in range(len(ds))] == want
    emb = list(embed_records(str(tmp_path / "c.tsv")))
    assert [json.loads(r.meta["captions"]) for r in emb] == want
    assert [r.caption for r in emb] == [c[0] for c in want]
    recs, classes, kind = read_input(tmp_path / "c.tsv")
    assert [r.captions for r in recs] == want and (classes, kind) == ([], "captions")
