"""Eval readers: every accepted layout, deterministic order, unreadable images counted."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.eval.datasets import caption_loader, labelled_loader, open_captions, open_labelled


def _tf(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def _folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i:02d}.jpg").write_bytes(_jpeg(10 * i))
    return root


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _all(loader) -> dict:
    batches = list(loader)
    return {
        "cls": torch.cat([b["cls"] for b in batches]).tolist(),
        "image": torch.cat([b["image"] for b in batches]),
        "skipped": sum(b["skipped"] for b in batches),
        "keys": [k for b in batches for k in b["skipped_keys"]],
    }


def test_image_folder_and_its_tar_agree(tmp_path) -> None:
    root = _folder(tmp_path / "tree")
    with tarfile.open(tmp_path / "tree.tar", "w") as tf:
        tf.add(root, arcname=".")
    a = open_labelled(str(root), _tf)
    b = open_labelled(str(tmp_path / "tree.tar"), _tf)
    assert a.classes == b.classes == ["cat", "dog"]
    da, db = _all(labelled_loader(a, batch_size=4)), _all(labelled_loader(b, batch_size=4))
    assert da["cls"] == db["cls"] == [0, 0, 0, 1, 1, 1]
    assert torch.equal(da["image"], db["image"])


def test_rank_slices_are_disjoint_and_complete(tmp_path) -> None:
    ls = open_labelled(str(_folder(tmp_path / "tree", per_class=5)), _tf)
    parts = [_all(labelled_loader(ls, batch_size=3, rank=r, world_size=3)) for r in range(3)]
    assert sum((p["cls"] for p in parts), []) == [0] * 5 + [1] * 5


def test_unreadable_image_is_skipped_and_named(tmp_path) -> None:
    root = _folder(tmp_path / "tree")
    (root / "dog" / "99.jpg").write_bytes(b"not a jpeg")
    out = _all(labelled_loader(str(root), _tf, batch_size=4))
    assert out["skipped"] == 1 and out["keys"][0].endswith("99.jpg")
    assert len(out["cls"]) == 6


def test_empty_or_missing_data_is_one_clear_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in ImageFolder directory"):
        open_labelled(str(tmp_path / "empty"), _tf)
    with pytest.raises(ValueError, match="not found"):
        open_labelled(str(tmp_path / "nope"), _tf)


def test_webdataset_cls_shards_and_clip_benchmark_layout(tmp_path) -> None:
    bench = tmp_path / "cb"
    (bench / "test").mkdir(parents=True)
    (bench / "classnames.txt").write_text("cat\ndog\nbird\n")
    (bench / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    (bench / "test" / "nshards.txt").write_text("2\n")
    labels = [2, 0, 1, 1, 0]
    for s in range(2):
        with tarfile.open(bench / "test" / f"{s}.tar", "w") as tf:
            for j, lab in enumerate(labels[s * 3 : s * 3 + 3]):
                key = f"s{s}_{j:04d}"
                _add(tf, f"{key}.webp" if j == 0 else f"{key}.jpg", _jpeg(lab * 50))
                _add(tf, f"{key}.cls", str(lab).encode())
    ls = open_labelled(str(bench), _tf)
    assert ls.classes == ["cat", "dog", "bird"] and ls.templates_file is not None
    assert _all(labelled_loader(ls, batch_size=2))["cls"] == labels
    shards = open_labelled(str(bench / "test" / "{0..1}.tar"), _tf)
    assert shards.classes is None
    # Two ranks over two shards: each rank reads its own shard.
    r0 = _all(labelled_loader(shards, batch_size=2, rank=0, world_size=2))["cls"]
    r1 = _all(labelled_loader(shards, batch_size=2, rank=1, world_size=2))["cls"]
    assert r0 + r1 == labels


def test_caption_tables_and_coco_json(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_jpeg(40 * i))
    (tmp_path / "c.tsv").write_text(
        "filepath\ttitle\nimg/0.jpg\ta\nimg/1.jpg\tb\nimg/0.jpg\tc\nimg/2.jpg\td\n"
    )
    (tmp_path / "c.csv").write_text('image,caption\nimg/0.jpg,"a, with comma"\nimg/1.jpg,b\n')
    batches = list(caption_loader(str(tmp_path / "c.tsv"), _tf, batch_size=2))
    assert [c for b in batches for c in b["captions"]] == [["a", "c"], ["b"], ["d"]]
    csv = list(caption_loader(str(tmp_path / "c.csv"), _tf, batch_size=8))
    assert csv[0]["captions"] == [["a, with comma"], ["b"]]
    (tmp_path / "ann").mkdir()
    coco = (
        '{"images": [{"id": 7, "file_name": "1.jpg"}, {"id": 3, "file_name": "0.jpg"}],'
        ' "annotations": [{"image_id": 7, "caption": "x"}, {"image_id": 3, "caption": "y"},'
        ' {"image_id": 7, "caption": "z"}]}'
    )
    (tmp_path / "ann" / "captions_img.json").write_text(coco)
    ds = open_captions(str(tmp_path / "ann" / "captions_img.json"), _tf)
    assert [t for _, t, _ in (ds[0], ds[1])] == [["y"], ["x", "z"]]  # sorted by image id
    (tmp_path / "bad.tsv").write_text("path_to\tcap\nimg/0.jpg\ta\n")
    with pytest.raises(ValueError, match=r"bad\.tsv: header .*filepath"):
        open_captions(str(tmp_path / "bad.tsv"), _tf)


def test_caption_shards(tmp_path) -> None:
    with tarfile.open(tmp_path / "0.tar", "w") as tf:
        for i in range(3):
            _add(tf, f"k{i}.jpg", _jpeg(i))
            _add(tf, f"k{i}.txt", f"first {i}\nsecond {i}\n".encode())
    batches = list(caption_loader(str(tmp_path / "0.tar"), _tf, batch_size=2))
    caps = [c for b in batches for c in b["captions"]]
    assert caps == [[f"first {i}", f"second {i}"] for i in range(3)]


def test_truncated_imagefolder_tar_is_reported_in_the_batches(tmp_path) -> None:
    root = _folder(tmp_path / "tree", per_class=10)
    with tarfile.open(tmp_path / "tree.tar", "w") as tf:
        tf.add(root, arcname=".")
    data = (tmp_path / "tree.tar").read_bytes()
    (tmp_path / "tree.tar").write_bytes(data[: len(data) * 2 // 3])
    batches = list(labelled_loader(str(tmp_path / "tree.tar"), _tf, batch_size=4))
    n = sum(len(b["cls"]) for b in batches)
    assert 0 < n < 20 and sum(b["skipped_shards"] for b in batches) == 1
    assert "truncated" in [k for b in batches for k in b["skipped_shard_keys"]][0]
