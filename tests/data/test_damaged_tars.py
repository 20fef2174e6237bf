"""One damage policy on every read path (issue 17): a damaged ImageFolder tar gives the same
kept/skipped counts in ``clipkit eval zeroshot``, ``data_tools.build_shards``, ``data_tools.verify``
and ``clipkit embed``, and each names the file in one warning.

The tars are cut from the real CIFAR-10 test tar (4 JPEGs per class, classes interleaved so every
class survives a cut) and damaged three ways: random bytes written over the middle, the file cut
inside a member's data, and the file cut exactly where a member's header starts.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from pathlib import Path

import pytest
import torch
from tar_helpers import write_plain_tar

from clipkit.cli import main as clipkit_main
from clipkit.data.sources import open_source
from clipkit.data.tar_samples import TarStats
from data_tools.build_shards import main as build_main
from data_tools.verify import main as verify_main
from data_tools.verify import verify

PER_CLASS = 4
MICRO = Path(__file__).parents[1] / "eval" / "micro_clip.json"


def _cifar_members(data_root: Path) -> list[tuple[str, bytes]]:
    """``PER_CLASS`` images of each class, round-robin over the classes (``./cls/name.jpg``)."""
    per: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(data_root / "cifar10" / "test.tar") as tf:
        for m in tf:
            cls = Path(m.name).parent.name
            if m.isfile() and len(per.setdefault(cls, [])) < PER_CLASS:
                per[cls].append((m.name, tf.extractfile(m).read()))
            if len(per) == 10 and all(len(v) == PER_CLASS for v in per.values()):
                break
    return [per[c][i] for i in range(PER_CLASS) for c in sorted(per)]


def _damaged(tmp: Path, members: list[tuple[str, bytes]], how: str) -> Path:
    path = tmp / f"{how}.tar"
    ends = write_plain_tar(path, members)
    data = bytearray(path.read_bytes())
    if how == "overwritten":  # 3,000 random bytes over the middle: headers and data hit
        mid = ends[len(ends) // 2]
        data[mid - 1000 : mid + 2000] = random.Random(0).randbytes(3000)
    elif how == "cut-in-member":  # 300 bytes into the data of member 31
        data = data[: ends[30] + 512 + 300]
    else:  # "cut-at-header": the file ends where member 31's header starts
        data = data[: ends[30]]
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def members(data_root: Path) -> list[tuple[str, bytes]]:
    return _cifar_members(data_root)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from clipkit.config.schema import ModelConfig
    from clipkit.models import build_dual_encoder

    torch.manual_seed(0)
    model = build_dual_encoder(ModelConfig(name=str(MICRO))).eval()
    return model.export(tmp_path_factory.mktemp("micro") / "export")


def _warnings_naming(caplog, path: Path) -> int:
    n = sum(str(path) in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    caplog.clear()
    return n


# (kept, skipped, damaged tars): the overwrite hits two headers (those members are lost) and
# one member's data (undecodable); the cut inside member 31 drops it as an incomplete sample.
@pytest.mark.parametrize(
    ("how", "expected"),
    [("overwritten", (37, 1, 1)), ("cut-in-member", (31, 1, 1)), ("cut-at-header", (31, 0, 1))],
)
def test_same_counts_in_eval_build_shards_verify_and_embed(
    members, export_dir, tmp_path, how, expected, caplog, capsys
) -> None:
    tar = _damaged(tmp_path, members, how)
    caplog.set_level(logging.WARNING)
    stats = TarStats()
    n_read = len(list(open_source(str(tar)).records(stats)))
    assert stats.skipped_shards == 1 and 0 < n_read < len(members)
    assert stats.partial_samples == (1 if how == "cut-in-member" else 0)
    caplog.clear()
    counts = {}

    out = tmp_path / "zeroshot.json"
    rc = clipkit_main(
        ["eval", "zeroshot", "--model", str(export_dir), "--data", str(tar),
         "--classnames", "cifar10", "--templates", "cifar10", "--output", str(out),
         "--no-progress", "--workers", "0", "--device", "cpu", "--batch-size", "64"]
    )  # fmt: skip
    r = json.loads(out.read_text())
    assert rc == 0 and r["skipped_shards"] == 1
    counts["eval"] = (r["n_samples"], r["skipped"], r["skipped_shards"])
    assert _warnings_naming(caplog, tar) == 1

    shards = tmp_path / "shards"
    assert build_main([str(tar), str(shards), "--workers", "1", "--no-shuffle"]) == 0
    st = json.loads((shards / "_stats.json").read_text())
    counts["build_shards"] = (
        st["count"],
        st["failed"] + st["incomplete_samples"],
        st["skipped_shards"],
    )
    assert "damaged input tar" in capsys.readouterr().out
    assert _warnings_naming(caplog, tar) == 1

    (res,), _ = verify(tar, workers=1)
    ok = res["samples"] - res["undecodable"]
    counts["verify"] = (ok, res["undecodable"] + res["incomplete"], int(bool(res["error"])))
    assert _warnings_naming(caplog, tar) == 1
    assert verify_main([str(tar), "--workers", "1"]) == 1  # damage fails a verification
    assert capsys.readouterr().out.strip().endswith("FAIL")
    caplog.clear()

    rc = clipkit_main(
        ["embed", "--model", str(export_dir), "--input", str(tar),
         "--output", str(tmp_path / "emb"), "--device", "cpu", "--modality", "image"]
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    counts["embed"] = (
        summary["records"] - summary["skipped"],
        summary["skipped"] + summary["incomplete_samples"],
        summary["skipped_shards"],
    )
    assert _warnings_naming(caplog, tar) == 1

    assert set(counts.values()) == {expected}, counts
    kept, skipped, _ = counts["eval"]
    assert kept + skipped - stats.partial_samples == n_read


def test_zeroed_region_is_damage_not_the_end_of_the_tar(members, tmp_path, caplog) -> None:
    """Zero blocks where a header belongs look like the end-of-archive marker; valid headers
    after them show they are not, so the scan reads on and counts the damage."""
    path = tmp_path / "zeroed.tar"
    ends = write_plain_tar(path, members)
    data = bytearray(path.read_bytes())
    data[ends[9] : ends[11]] = bytes(ends[11] - ends[9])  # members 10 and 11, headers included
    path.write_bytes(bytes(data))
    stats = TarStats()
    with caplog.at_level(logging.WARNING):
        keys = [r.key for r in open_source(str(path)).records(stats)]
    assert len(keys) == len(members) - 2 and stats.unreadable_shards == 1
    lost = {Path(n).with_suffix("").as_posix().removeprefix("./") for n, _ in members[10:12]}
    assert lost.isdisjoint(keys)
    assert f"skipped {ends[11] - ends[9]} damaged bytes" in str(stats.problems[0])
    assert _warnings_naming(caplog, path) == 1
