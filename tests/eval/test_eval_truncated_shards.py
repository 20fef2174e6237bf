"""Evaluators on damaged WebDataset shards: cut short, counted and reported, never raised."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tar_helpers import write_plain_tar

from clipkit.cli import main
from clipkit.eval import retrieval, zero_shot
from clipkit.eval.datasets import LabelledShards, collate, decode_image, labelled_loader

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
TEMPLATES = ["a {} square."]


def _jpeg(colour: tuple[int, int, int], size=(32, 32), orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.new("RGB", size, colour).save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _samples(n: int, second: str = "cls", bad: int | None = None) -> list[tuple[str, bytes]]:
    """``n`` samples ``s000..``: a JPEG of colour ``i % 3`` and its label (or caption)."""
    names = list(COLOURS)
    out = []
    for i in range(n):
        c = i % 3
        out.append(
            (f"s{i:03d}.jpg", b"garbage, not a JPEG" if i == bad else _jpeg(COLOURS[names[c]]))
        )
        out.append((f"s{i:03d}.{second}", (str(c) if second == "cls" else f"{names[c]}").encode()))
    return out


def _damaged_shards(root: Path, second: str = "cls") -> Path:
    """Three shards of 4 samples: a garbage JPEG (s001 of 0.tar), a cut inside s002.jpg of 1.tar,
    and 2.tar cut between s003.jpg and its label (no end-of-archive marker).

    The reader yields 4 + 2 + 3 samples; 8 decode; s001 and the half sample s003 are skipped.
    """
    root.mkdir()
    write_plain_tar(root / "0.tar", _samples(4, second, bad=1))
    ends = write_plain_tar(root / "1.tar", _samples(4, second))
    (root / "1.tar").write_bytes((root / "1.tar").read_bytes()[: ends[3] + 512 + 200])
    ends = write_plain_tar(root / "2.tar", _samples(4, second))
    (root / "2.tar").write_bytes((root / "2.tar").read_bytes()[: ends[6]])
    return root


@pytest.fixture(scope="module")
def export_dir(micro_model, tmp_path_factory) -> Path:
    return micro_model.export(tmp_path_factory.mktemp("export"))


def test_exif_orientation_is_applied() -> None:
    img = decode_image(_jpeg((200, 10, 10), size=(40, 20), orientation=6))
    assert img is not None and img.size == (20, 40) and img.mode == "RGB"
    assert decode_image(_jpeg((200, 10, 10), size=(40, 20))).size == (40, 20)
    assert decode_image(b"garbage") is None and decode_image(b"") is None


def test_shards_decode_exif_rotated(tmp_path) -> None:
    write_plain_tar(
        tmp_path / "0.tar",
        [("a.jpg", _jpeg((9, 9, 9), (40, 20), orientation=6)), ("a.cls", b"0")],
    )
    ds = LabelledShards([str(tmp_path / "0.tar")], lambda im: torch.tensor(im.size))
    batch = collate(list(ds))
    assert batch["image"].tolist() == [[20, 40]] and batch["skipped_shards"] == 0


def test_zero_shot_cli_reports_skipped_samples_and_shards(export_dir, tmp_path, capsys) -> None:
    data = _damaged_shards(tmp_path / "shards")
    (tmp_path / "names.txt").write_text("\n".join(COLOURS) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(TEMPLATES) + "\n")
    out = tmp_path / "r.json"
    rc = main(
        ["eval", "zeroshot", "--model", str(export_dir), "--data", str(data),
         "--classnames", str(tmp_path / "names.txt"), "--templates", str(tmp_path / "t.txt"),
         "--output", str(out), "--no-progress", "--workers", "0"]
    )  # fmt: skip
    err = capsys.readouterr().err
    r = json.loads(out.read_text())
    assert rc == 0 and r["n_samples"] == 8 and r["skipped"] == 2 and r["skipped_shards"] == 2
    assert r["skipped_examples"] == [f"{data / '0.tar'}:s001", f"{data / '2.tar'}:s003"]
    one, two = r["skipped_shard_examples"]
    assert one.startswith(f"{data / '1.tar'}: truncated shard (unexpected end of data in s002")
    assert "kept 2 sample(s)" in one
    assert two.startswith(f"{data / '2.tar'}: truncated shard (no end-of-archive marker")
    assert "kept 3 sample(s)" in two and "incomplete sample s003" in two
    assert "warning: skipped 2 unreadable or incomplete sample(s)" in err
    assert "warning: 2 shard(s) truncated or unreadable" in err


def test_zero_shot_counts_damage_from_loader_workers(micro_model, tmp_path) -> None:
    data = _damaged_shards(tmp_path / "shards")
    for workers in (0, 2):  # with workers, the shard problems cross process boundaries
        loader = labelled_loader(
            str(data), micro_model.preprocess_eval, batch_size=3, workers=workers
        )
        out = zero_shot(micro_model, loader, list(COLOURS), TEMPLATES)
        assert (out["n"], out["skipped"], out["skipped_shards"]) == (8, 2, 2), workers


def test_retrieval_on_damaged_caption_shards(micro_model, tmp_path) -> None:
    data = _damaged_shards(tmp_path / "caps", second="txt")
    out = retrieval(micro_model, str(data), batch_size=4)
    assert (out["n_images"], out["n_captions"]) == (8, 8)
    assert (out["skipped"], out["skipped_shards"]) == (2, 2)
