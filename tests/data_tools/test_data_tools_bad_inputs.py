"""data_tools on bad input (issue 17): one line on stderr, exit 2, found before the shards or the
input are read, nothing half-written left behind."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

import data_tools.verify as verify_mod
from data_tools.build_shards import main as build_main
from data_tools.verify import main as verify_main


def _shards(out: Path, n: int = 3) -> Path:
    out.mkdir(parents=True)
    with wds.TarWriter(str(out / "00000.tar")) as tw:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (40 * i, 90, 160)).save(buf, "JPEG")
            tw.write({"__key__": f"k{i}", "jpg": buf.getvalue(), "txt": f"caption {i}"})
    (out / "sizes.json").write_text(json.dumps({"00000.tar": n}))
    return out


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "%|" not in ln]
    assert len(err) == 1, err  # (progress bars aside)
    return err[0]


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.parametrize("kind", ["folder", "no_parent", "read_only", "bad_extension"])
def test_verify_grid_is_checked_before_any_shard_is_read(tmp_path, capsys, monkeypatch, kind):
    shards = _shards(tmp_path / "shards")
    read = []
    monkeypatch.setattr(verify_mod, "check_shard", lambda *a, **k: read.append(a))
    if kind == "folder":
        grid, needle = tmp_path, "is a folder"
    elif kind == "no_parent":
        grid, needle = tmp_path / "nope" / "g.png", "folder does not exist"
    elif kind == "read_only":
        grid, needle = tmp_path / "g.png", "not writable"
        monkeypatch.setattr("clipkit.train.outputs.tempfile.mkstemp", _read_only)
    else:
        grid, needle = tmp_path / "g.notanimage", "unknown image extension"
    assert verify_main([str(shards), "--grid", str(grid), "--workers", "1"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("verify: error: --grid") and needle in line and read == []
    assert not list(tmp_path.rglob("*.tmp*"))


def test_verify_grid_write_failure_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    shards = _shards(tmp_path / "shards")
    grid = tmp_path / "g.png"

    def full(self, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "replace", full)
    assert verify_main([str(shards), "--grid", str(grid), "--workers", "1"]) == 2
    line = _one_error_line(capsys)
    assert "contact sheet: cannot write" in line and "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no g.png, no g.tmpPID.png


COCO_CASES = [
    ('{"annotations": []}', "missing key 'images'"),
    ('{"images": {}, "annotations": []}', "'images' must be a list, found dict"),
    ('{"images": [{"id": 1}], "annotations": []}', "images[0] has no 'file_name' key"),
    (
        '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"caption": "x"}]}',
        "annotations[0] has no 'image_id' key",
    ),
    ("[1, 2]", "want an object with 'images' and 'annotations', found a JSON list"),
    ("{not json", "not readable JSON"),
]


@pytest.mark.parametrize(("content", "needle"), COCO_CASES)
def test_build_shards_names_coco_file_and_key(tmp_path, capsys, content, needle):
    coco = tmp_path / "captions_val2017.json"
    coco.write_text(content)
    assert build_main([str(coco), str(tmp_path / "out"), "--workers", "1"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"build_shards: error: COCO captions file {coco}: {needle}"), line
    assert not (tmp_path / "out").exists()  # nothing written for a bad input


def _folder(root: Path, n: int = 6) -> Path:
    for i in range(n):
        d = root / ("cat" if i % 2 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 * i, 90, 160)).save(d / f"{i}.jpg")
    return root


def test_build_shards_output_checked_before_the_input_is_read(tmp_path, capsys, monkeypatch):
    import data_tools.build_shards as bs

    read = []
    monkeypatch.setattr(bs, "read_input", lambda *a, **k: read.append(a))
    (tmp_path / "out").write_text("")
    assert build_main([str(_folder(tmp_path / "in")), str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert line == f"build_shards: error: OUTPUT_DIR {tmp_path / 'out'} is a file, not a folder"
    assert read == []


def test_build_shards_full_disk_is_one_line_and_leaves_no_shards(tmp_path, capsys, monkeypatch):
    calls = []

    def full(self, sample):
        calls.append(sample["__key__"])
        if len(calls) > 4:  # the first shard is whole, the second breaks
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, sample)

    real = wds.TarWriter.write
    monkeypatch.setattr(wds.TarWriter, "write", full)
    out = tmp_path / "out"
    args = [str(_folder(tmp_path / "in")), str(out), "--shard-size", "3", "--workers", "1"]
    assert build_main(args) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"build_shards: error: shards: cannot write {out}: No space")
    assert list(out.iterdir()) == []  # no shard, no .tmp, no stats: nothing looks whole
