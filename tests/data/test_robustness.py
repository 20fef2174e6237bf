"""A damaged corpus trains for an epoch; every skip is counted once; nothing hangs."""

from __future__ import annotations

import tarfile

import pytest
import torch
import webdataset as wds
from data_helpers import toy_tokenizer

from clipkit.config.schema import DataConfig
from clipkit.data import build_eval_loader, build_train_loader

N_SHARDS, PER = 4, 20


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, photos):
    """4 x 20 samples: 4 garbage images (5%), 3 missing captions, 2 missing images,
    and the last shard truncated in the middle of sample 75's image."""
    out = tmp_path_factory.mktemp("damaged")
    garbage = {3, 22, 41, 58}
    no_caption = {7, 30, 50}
    no_image = {12, 44}
    sizes = {}
    for s in range(N_SHARDS):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(out / name)) as tw:
            for i in range(s * PER, (s + 1) * PER):
                sample = {"__key__": f"{i:06d}", "cls": str(i % 10)}
                if i not in no_image:
                    sample["jpg"] = b"\x00garbage\xff" * 50 if i in garbage else photos[i]
                if i not in no_caption:
                    sample["txt"] = f"caption {i}"
                tw.write(sample)
        sizes[name] = PER
    (out / "sizes.json").write_text(__import__("json").dumps(sizes))
    last = out / f"{N_SHARDS - 1:05d}.tar"
    with tarfile.open(last) as tf:
        member = next(m for m in tf.getmembers() if m.name == "000075.jpg")
    data = last.read_bytes()
    last.write_bytes(data[: member.offset_data + member.size // 2])
    return (
        out,
        {
            "corrupt_image": len(garbage),
            "missing_caption": len(no_caption),
            # TarWriter writes key.cls before key.jpg: sample 75 keeps its cls, loses its image
            "missing_image": len(no_image) + 1,
            "truncated_shard": 1,
        },
        75 - len(garbage) - len(no_caption) - len(no_image),
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_corpus_trains_one_epoch_with_exact_skip_counts(damaged, workers):
    root, expected, good = damaged
    cfg = DataConfig(train=str(root / "{00000..00003}.tar"), workers=workers, shuffle_buffer=10)
    loader = build_train_loader(
        cfg,
        tokenizer=toy_tokenizer,
        image_size=32,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        batch_size=8,
        seed=0,
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(3 * 32 * 32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps, keys = 0, []
    for batch in loader:
        x = loader.normalize(batch["image"]).flatten(1)  # (B, 3072)
        loss = torch.nn.functional.cross_entropy(model(x), batch["cls"] % 8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        keys += batch["key"]
    assert steps == loader.num_batches  # the quota held despite the lost samples
    for k, v in expected.items():
        assert loader.stats[k] == v, (k, loader.stats)
    assert len(set(keys)) == good  # every usable sample was seen, padding re-used a few


def test_eval_loader_counts_and_skips(damaged):
    root, expected, good = damaged
    loader = build_eval_loader(str(root / "{00000..00003}.tar"), 32, (0.5,) * 3, (0.5,) * 3, 16)
    keys = [k for b in loader for k in b["key"]]
    # eval needs no caption: only the images are missing or broken
    assert len(keys) == 75 - expected["corrupt_image"] - len([12, 44])
    assert loader.stats["corrupt_image"] == expected["corrupt_image"]
    assert loader.stats["truncated_shard"] == 1


def test_missing_and_non_tar_shards(tmp_path, damaged):
    root, _, _ = damaged
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file at all" * 100)
    loader = build_eval_loader(
        f"{tmp_path / 'bad.tar'}::{root / '00000.tar'}", 32, (0.5,) * 3, (0.5,) * 3, 16
    )
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 20 - 2  # shard 0 holds garbage 3 and no_image 12
    assert loader.stats["truncated_shard"] + loader.stats["tar_error"] >= 1
    with pytest.raises(ValueError, match="shard not found"):
        build_eval_loader(str(tmp_path / "nope-{0..3}.tar"), 32, (0.5,) * 3, (0.5,) * 3, 4)


def test_resume_keeps_skip_counts_exact(damaged):
    root, expected, _ = damaged
    cfg = DataConfig(train=str(root / "{00000..00003}.tar"), workers=2, shuffle_buffer=10)
    kw = dict(
        tokenizer=toy_tokenizer,
        image_size=32,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        batch_size=8,
        seed=0,
    )
    first = build_train_loader(cfg, **kw)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    resumed = build_train_loader(cfg, **kw)
    resumed.load_state_dict(state)
    n = sum(1 for _ in resumed)
    assert n == resumed.num_batches - 3
    for k, v in expected.items():
        assert resumed.stats[k] == v, (k, resumed.stats)


def test_tar_cut_at_a_header_boundary_is_counted(tmp_path, photos):
    """Python's tar stream reads a tar cut between members as a clean end; we still count it."""
    with wds.TarWriter(str(tmp_path / "a.tar")) as tw:
        for i in range(6):
            tw.write({"__key__": f"{i:03d}", "jpg": photos[i], "txt": f"c {i}"})
    data = (tmp_path / "a.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tf:
        cut = next(m for m in tf.getmembers() if m.name == "004.jpg").offset  # header start
    (tmp_path / "a.tar").write_bytes(data[:cut])
    loader = build_eval_loader(str(tmp_path / "a.tar"), 16, (0.5,) * 3, (0.5,) * 3, 4)
    keys = [k for b in loader for k in b["key"]]
    assert keys == ["000", "001", "002", "003"]
    assert loader.stats["truncated_shard"] == 1


def test_gzip_shard_is_not_called_truncated_but_a_cut_one_is(tmp_path, photos):
    import gzip

    with wds.TarWriter(str(tmp_path / "a.tar")) as tw:
        for i in range(6):
            tw.write({"__key__": f"{i:03d}", "jpg": photos[i], "txt": f"c {i}"})
    packed = gzip.compress((tmp_path / "a.tar").read_bytes())
    (tmp_path / "a.tar.gz").write_bytes(packed)
    loader = build_eval_loader(str(tmp_path / "a.tar.gz"), 16, (0.5,) * 3, (0.5,) * 3, 4)
    assert [k for b in loader for k in b["key"]] == [f"{i:03d}" for i in range(6)]
    assert loader.stats["truncated_shard"] == 0
    (tmp_path / "cut.tar.gz").write_bytes(packed[: len(packed) // 2])  # decompressor fails
    loader = build_eval_loader(str(tmp_path / "cut.tar.gz"), 16, (0.5,) * 3, (0.5,) * 3, 4)
    assert len([k for b in loader for k in b["key"]]) < 6
    assert loader.stats["truncated_shard"] + loader.stats["tar_error"] == 1
