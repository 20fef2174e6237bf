"""``clipkit embed`` over damaged shards: read up to the damage, counted in manifest and summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tar_helpers import write_plain_tar

from clipkit.cli import main
from clipkit.embed.dataset import embed_dataset, load_embeddings
from clipkit.embed.embedder import load_image
from clipkit.embed.sources import iter_records


def _jpeg(i: int, size=(48, 32), orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _samples(shard: int, n: int, bad: int | None = None) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        key = f"{shard}_{i:03d}"
        out.append((f"{key}.jpg", b"garbage, not a JPEG" if i == bad else _jpeg(10 * shard + i)))
        out.append((f"{key}.txt", f"caption {key}".encode()))
    return out


def _damaged_shards(root: Path) -> Path:
    """shard-000: 4 samples, 0_001's JPEG is garbage; shard-001: cut inside 1_002.jpg;
    shard-002: cut between 2_003.jpg and its caption, no end-of-archive marker.

    The reader yields 4 + 2 + 3 records (ids 0..8); 0_001 (id 1) has an unreadable image and the
    half sample 2_003 is dropped before it gets an id.
    """
    root.mkdir()
    write_plain_tar(root / "shard-000.tar", _samples(0, 4, bad=1))
    ends = write_plain_tar(root / "shard-001.tar", _samples(1, 4))
    (root / "shard-001.tar").write_bytes((root / "shard-001.tar").read_bytes()[: ends[3] + 600])
    ends = write_plain_tar(root / "shard-002.tar", _samples(2, 4))
    (root / "shard-002.tar").write_bytes((root / "shard-002.tar").read_bytes()[: ends[6]])
    return root


def test_load_image_applies_exif_orientation(tmp_path) -> None:
    data = _jpeg(1, size=(40, 20), orientation=6)
    assert load_image(data).size == (20, 40)
    (tmp_path / "r.jpg").write_bytes(data)
    assert load_image(str(tmp_path / "r.jpg")).size == (20, 40)
    assert load_image(_jpeg(1, size=(40, 20))).size == (40, 20)
    # The pixel limit is checked on the stored size in the header, before decoding.
    with pytest.raises(ValueError, match="im: 40x20 = 800 pixels exceeds the limit of 799"):
        load_image(data, max_pixels=799, what="im")
    with pytest.raises(ValueError, match="im: not a readable image"):
        load_image(b"garbage", what="im")


def test_iter_shards_reads_up_to_the_damage(tmp_path) -> None:
    from clipkit.data.tar_samples import TarStats

    data = _damaged_shards(tmp_path / "shards")
    stats = TarStats()
    recs = list(iter_records(str(data), stats=stats))
    assert [r.key for r in recs] == [
        "0_000", "0_001", "0_002", "0_003", "1_000", "1_001", "2_000", "2_001", "2_002",
    ]  # fmt: skip
    assert [r.id for r in recs] == list(range(9)) and recs[4].caption == "caption 1_000"
    assert recs[4].path == f"{data / 'shard-001.tar'}#1_000"
    assert (stats.truncated_shards, stats.unreadable_shards, stats.partial_samples) == (2, 0, 1)


def test_embed_cli_counts_skipped_shards(tiny_export, tmp_path, capsys) -> None:
    data = _damaged_shards(tmp_path / "shards")
    out = tmp_path / "emb"
    rc = main(
        ["embed", "--model", str(tiny_export), "--input", str(data), "--output", str(out),
         "--partition-size", "4", "--device", "cpu"]
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    assert (summary["records"], summary["skipped"]) == (9, 1)
    assert (summary["skipped_shards"], summary["incomplete_samples"]) == (2, 1)
    man = json.loads((out / "embeddings.json").read_text())
    assert man["complete"] and man["skipped_shards"] == 2 and man["incomplete_samples"] == 1
    one, two = man["skipped_shard_examples"]
    assert one.startswith(f"{data / 'shard-001.tar'}: truncated shard (unexpected end of data")
    assert two.startswith(f"{data / 'shard-002.tar'}: truncated shard (no end-of-archive marker")
    assert [p["skipped"] for p in man["partitions"].values()] == [1, 0, 0]
    x, meta, _ = load_embeddings(out)
    assert meta["id"].tolist() == [0, 2, 3, 4, 5, 6, 7, 8] and x.shape[0] == 8
    assert meta["key"].tolist()[-1] == "2_002"


def test_only_damaged_shards_is_one_clear_error(embedder, tmp_path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "0.tar").write_bytes(b"not a tar " * 200)
    with pytest.raises(ValueError, match=r"no records \(.*0\.tar: unreadable shard"):
        embed_dataset(embedder, str(tmp_path / "s"), tmp_path / "out", progress=False)
