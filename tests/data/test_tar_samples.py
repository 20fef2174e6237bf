"""The shared tar-sample reader: webdataset grouping on good tars, damage cut short and counted."""

from __future__ import annotations

import gzip
import io
import logging
from pathlib import Path

import webdataset as wds
from PIL import Image
from tar_helpers import write_plain_tar

from clipkit.data.decode import DecodeError, open_pil
from clipkit.data.tar_samples import TRUNCATED, UNREADABLE, TarStats, tar_samples


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (10 * i, 255 - 10 * i, 7 * i)).save(buf, format="JPEG")
    return buf.getvalue()


def _labelled(n: int, bad: int | None = None) -> list[tuple[str, bytes]]:
    """``n`` samples of ``k.jpg`` + ``k.cls``; sample ``bad`` gets garbage for its JPEG."""
    out = []
    for i in range(n):
        out.append((f"s{i:03d}.jpg", b"not a jpeg at all" if i == bad else _jpeg(i)))
        out.append((f"s{i:03d}.cls", str(i % 3).encode()))
    return out


def _cut(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def _read(paths: list[Path]) -> tuple[list[str], TarStats]:
    stats = TarStats()
    keys = [s["__key__"] for s in tar_samples(paths, stats)]
    return keys, stats


def test_good_tars_match_webdataset(tmp_path) -> None:
    members = [
        ("./d/a.jpg", _jpeg(1)),
        ("./d/a.CLS", b"1"),
        ("./d/a.seg.png", b"png bytes"),  # key ends at the first dot of the name
        ("__index__", b"meta"),  # webdataset metadata: no sample
        ("README", b"no extension: skipped"),
        ("d/b.jpg", _jpeg(2)),
        ("d/b.cls", b"2"),
    ]
    write_plain_tar(tmp_path / "0.tar", members)
    ours = list(tar_samples([tmp_path / "0.tar"]))
    theirs = list(wds.tarfile_samples([{"url": str(tmp_path / "0.tar")}]))
    assert [s["__key__"] for s in ours] == ["d/a", "d/b"]
    assert [s["__key__"] for s in theirs] == ["./d/a", "d/b"]  # we also drop a leading "./"
    for a, b in zip(ours, theirs):
        assert {k: v for k, v in a.items() if k != "__key__"} == {
            k: v for k, v in b.items() if k != "__key__"
        }
    assert sorted(ours[0]) == ["__key__", "__url__", "cls", "jpg", "seg.png"]
    assert ours[0]["__url__"] == str(tmp_path / "0.tar")
    # A gzipped shard reads the same.
    (tmp_path / "1.tar.gz").write_bytes(gzip.compress((tmp_path / "0.tar").read_bytes()))
    keys, stats = _read([tmp_path / "1.tar.gz"])
    assert keys == ["d/a", "d/b"] and stats.skipped_shards == 0


def test_truncated_mid_member_keeps_what_came_before(tmp_path, caplog) -> None:
    ends = write_plain_tar(tmp_path / "0.tar", _labelled(5))
    # Inside the data of s003.jpg (member 6): s000..s002 are whole.
    _cut(tmp_path / "0.tar", ends[5] + 512 + 100)
    write_plain_tar(tmp_path / "1.tar", _labelled(2))
    with caplog.at_level(logging.WARNING, logger="clipkit.data.tar_samples"):
        keys, stats = _read([tmp_path / "0.tar", tmp_path / "1.tar"])
    assert keys == ["s000", "s001", "s002", "s000", "s001"]
    assert (stats.shards, stats.samples, stats.truncated_shards) == (2, 5, 1)
    assert (stats.unreadable_shards, stats.partial_samples) == (0, 0)
    [p] = stats.problems
    assert (p.kind, p.samples, p.dropped_key) == (TRUNCATED, 3, None)
    assert "unexpected end of data in s003.jpg" in p.reason
    [rec] = caplog.records
    assert str(tmp_path / "0.tar") in rec.getMessage() and "\n" not in rec.getMessage()
    # Inside the data of s003.cls: s003's JPEG was read, but the sample is incomplete.
    ends = write_plain_tar(tmp_path / "2.tar", _labelled(5))
    _cut(tmp_path / "2.tar", ends[6] + 100)
    keys, stats = _read([tmp_path / "2.tar"])
    assert keys == ["s000", "s001", "s002"]
    assert (stats.truncated_shards, stats.partial_samples) == (1, 1)
    assert stats.problems[0].dropped_key == "s003"


def test_cut_between_members_is_counted(tmp_path) -> None:
    # Exactly at a sample boundary, end-of-archive blocks dropped: every sample is whole.
    ends = write_plain_tar(tmp_path / "0.tar", _labelled(4))
    _cut(tmp_path / "0.tar", ends[-1])
    keys, stats = _read([tmp_path / "0.tar"])
    assert keys == ["s000", "s001", "s002", "s003"]
    assert (stats.truncated_shards, stats.partial_samples) == (1, 0)
    assert "no end-of-archive marker" in stats.problems[0].reason
    # Between the .jpg and the .cls of s002: s002 lacks its label and is dropped.
    ends = write_plain_tar(tmp_path / "1.tar", _labelled(4))
    _cut(tmp_path / "1.tar", ends[4])
    keys, stats = _read([tmp_path / "1.tar"])
    assert keys == ["s000", "s001"]
    assert (stats.samples, stats.truncated_shards, stats.partial_samples) == (2, 1, 1)
    # Inside the next header.
    ends = write_plain_tar(tmp_path / "2.tar", _labelled(4))
    _cut(tmp_path / "2.tar", ends[3] + 200)
    keys, stats = _read([tmp_path / "2.tar"])
    assert keys == ["s000", "s001"] and stats.truncated_shards == 1


def test_garbage_image_is_a_sample_for_the_decoder_to_skip(tmp_path) -> None:
    write_plain_tar(tmp_path / "0.tar", _labelled(4, bad=2))
    samples = list(tar_samples([tmp_path / "0.tar"]))
    assert len(samples) == 4
    decoded = []
    for s in samples:
        try:
            decoded.append(open_pil(s["jpg"]).size)
        except DecodeError:
            decoded.append(None)
    assert decoded == [(24, 16), (24, 16), None, (24, 16)]


def test_unreadable_shards_never_raise(tmp_path) -> None:
    write_plain_tar(tmp_path / "good.tar", _labelled(2))
    (tmp_path / "garbage.tar").write_bytes(b"definitely not a tar " * 100)
    (tmp_path / "empty.tar").write_bytes(b"")
    # An invalid header after two samples; the file still ends with zero blocks.
    ends = write_plain_tar(tmp_path / "badhdr.tar", _labelled(3))
    raw = bytearray((tmp_path / "badhdr.tar").read_bytes())
    raw[ends[3] : ends[3] + 512] = b"\x01" * 512
    (tmp_path / "badhdr.tar").write_bytes(bytes(raw))
    order = ["garbage.tar", "good.tar", "missing.tar", "badhdr.tar", "empty.tar", "good.tar"]
    got: list = []
    stats = TarStats()
    keys = [s["__key__"] for s in tar_samples([tmp_path / n for n in order], stats, got.append)]
    assert keys == ["s000", "s001"] * 3
    assert [(Path(p.url).name, p.kind) for p in got] == [
        ("garbage.tar", UNREADABLE),
        ("missing.tar", UNREADABLE),
        ("badhdr.tar", UNREADABLE),
        ("empty.tar", TRUNCATED),
    ]
    assert stats.as_dict() == {
        "shards": 6,
        "samples": 6,
        "truncated_shards": 1,
        "unreadable_shards": 3,
        "partial_samples": 0,
    }
    assert stats.skipped_shards == 4 and stats.problems == got
    assert f"invalid tar header at byte {ends[3]}" in str(got[2])
