"""verify: a clean folder passes; each kind of damage is found, named, and fails the run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_tools.inspect import main as inspect_main
from data_tools.verify import main as verify_main
from data_tools.verify import verify


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 40 % 255, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def _write(out: Path, shards: dict[str, list[dict]], sizes: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in shards.items():
        with wds.TarWriter(str(out / name)) as tw:
            for s in samples:
                tw.write(s)
    sizes = sizes if sizes is not None else {n: len(s) for n, s in shards.items()}
    (out / "sizes.json").write_text(json.dumps(sizes))


def _good(i: int) -> dict:
    return {"__key__": f"k{i:04d}", "jpg": _jpeg(i), "txt": f"caption {i}"}


def test_clean_folder_passes_and_writes_grid(tmp_path, capsys):
    _write(
        tmp_path,
        {"00000.tar": [_good(i) for i in range(5)], "00001.tar": [_good(i) for i in range(5, 8)]},
    )
    grid = tmp_path / "grid.png"
    assert verify_main([str(tmp_path), "--grid", str(grid), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL      8" in out and out.strip().endswith("OK")
    assert Image.open(grid).size[0] > 0


def test_every_kind_of_damage_is_reported(tmp_path, capsys):
    bad = [
        _good(0),
        {"__key__": "k0001", "jpg": b"garbage bytes", "txt": "x"},
        {"__key__": "k0002", "txt": "no image"},
        {"__key__": "k0003", "jpg": _jpeg(3)},
    ]
    _write(
        tmp_path,
        {"00000.tar": bad, "00001.tar": [_good(0)]},
        sizes={"00000.tar": 9, "00001.tar": 1},
    )
    (tmp_path / "00002.tar").write_bytes(b"not a tar" * 50)
    results, problems = verify(tmp_path, workers=1)
    r0 = results[0]
    assert (r0["samples"], r0["undecodable"], r0["no_image"], r0["no_caption"]) == (4, 1, 1, 1)
    assert results[2]["error"]
    assert any("k0000" in p and "several shards" in p for p in problems)
    assert any("sizes.json says 9" in p for p in problems)
    assert any("no entry for 00002.tar" in p for p in problems)
    assert verify_main([str(tmp_path), "--workers", "2"]) == 1
    assert capsys.readouterr().out.strip().endswith("FAIL")
    assert inspect_main([str(tmp_path), "--workers", "1"]) == 0  # same report, no failure


def test_truncated_shard_is_reported(tmp_path):
    _write(tmp_path, {"00000.tar": [_good(i) for i in range(6)]})
    p = tmp_path / "00000.tar"
    p.write_bytes(p.read_bytes()[:3000])
    results, _ = verify(tmp_path, workers=1)
    assert results[0]["error"] and results[0]["samples"] < 6
    assert verify_main([str(tmp_path), "--workers", "1"]) == 1


@pytest.mark.parametrize("arg", ["missing-dir", "empty"])
def test_bad_folder_is_one_line_error(tmp_path, capsys, arg):
    (tmp_path / "empty").mkdir()
    assert verify_main([str(tmp_path / arg)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
