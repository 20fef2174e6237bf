"""build_train_loader: batch layout, epoch coverage, node/worker split, exact resume."""

from __future__ import annotations

import pytest
import torch
from data_helpers import toy_tokenizer

from clipkit.config.schema import DataConfig
from clipkit.data import build_train_loader

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def _loader(shard_dir, *, workers=2, batch=4, rank=0, world=1, train=True, **cfg):
    c = DataConfig(train=str(shard_dir / "{00000..00007}.tar"), workers=workers, **cfg)
    return build_train_loader(
        c,
        tokenizer=toy_tokenizer,
        image_size=32,
        mean=MEAN,
        std=STD,
        batch_size=batch,
        seed=3,
        rank=rank,
        world_size=world,
        train=train,
    )


def test_batch_layout_and_normalize(shard_dir):
    loader = _loader(shard_dir, shuffle_buffer=16)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["text"].shape == (4, 8) and batch["text"].dtype == torch.long
    assert batch["cls"].shape == (4,) and len(batch["key"]) == 4
    x = loader.normalize(batch["image"])
    ref = (batch["image"].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref)
    # cls travels with its sample: keys were written as i, cls = i % 10
    assert [int(k) % 10 for k in batch["key"]] == batch["cls"].tolist()


def test_epoch_covers_every_sample_once_per_epoch(shard_dir):
    loader = _loader(shard_dir, shuffle_buffer=16, batch=6)  # 48 samples per worker, 8 batches
    assert loader.num_batches == 16
    seen = [k for b in loader for k in b["key"]]
    assert len(seen) == 96 and len(set(seen)) == 96
    loader.set_epoch(1)
    again = [k for b in loader for k in b["key"]]
    assert sorted(again) == sorted(seen) and again != seen  # reshuffled per epoch


def test_two_nodes_two_workers_partition_the_dataset(shard_dir):
    """Epoch mode across 2 ranks x 2 workers: union = dataset, no duplicates, equal steps."""
    keys, steps = [], []
    for rank in range(2):
        loader = _loader(shard_dir, rank=rank, world=2, batch=6, shuffle_buffer=16)
        batches = list(loader)
        steps.append(len(batches))
        keys += [k for b in batches for k in b["key"]]
    assert steps == [8, 8]
    assert len(keys) == len(set(keys)) == 96
    assert set(keys) == {f"{i:06d}" for i in range(96)}


def test_eval_mode_reads_everything_in_order(shard_dir):
    loader = _loader(shard_dir, workers=0, batch=5, train=False)
    keys = [k for b in loader for k in b["key"]]
    assert keys == [f"{i:06d}" for i in range(96)]


def test_too_few_shards_for_readers_is_a_clear_error(shard_dir):
    with pytest.raises(ValueError, match="8 shards but 2 ranks x 5 workers"):
        _loader(shard_dir, workers=5, world=2)


def _run(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_exact_resume_mid_epoch(shard_dir):
    full = _run(_loader(shard_dir, shuffle_buffer=16, batch=5))
    for stop in (1, 4, 7):
        first = _loader(shard_dir, shuffle_buffer=16, batch=5)
        head = _run(first, stop)
        state = first.state_dict()
        resumed = _loader(shard_dir, shuffle_buffer=16, batch=5)
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # the trainer calls this on resume: must not reset the position
        tail = _run(resumed)
        got = head + tail
        assert [b["key"] for b in got] == [b["key"] for b in full]
        for a, b in zip(got, full):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def _resampled(tmp_path, photos):
    from data_helpers import write_shards

    if not (tmp_path / "b").exists():
        write_shards(tmp_path / "a", photos[:40], 10)  # keys 000000..000039
        write_shards(tmp_path / "b", photos[40:80], 10, key_offset=1000)  # keys 001000..
    c = DataConfig(
        train=f"{tmp_path}/a/{{00000..00003}}.tar::{tmp_path}/b/{{00000..00003}}.tar",
        weights=[3.0, 1.0],
        resampled=True,
        num_samples=400,
        workers=2,
        shuffle_buffer=8,
    )
    return build_train_loader(
        c, tokenizer=toy_tokenizer, image_size=16, mean=MEAN, std=STD, batch_size=10, seed=0
    )


def test_resampled_mode_is_weighted_and_sized(tmp_path, photos):
    loader = _resampled(tmp_path, photos)
    assert loader.num_batches == 40
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 400
    frac_a = sum(int(k) < 1000 for k in keys) / len(keys)
    assert 0.6 < frac_a < 0.9  # weights 3:1 -> 0.75 expected (40 shard draws)
    loader.set_epoch(1)
    assert [k for b in loader for k in b["key"]] != keys  # new draws each epoch


def test_resampled_mode_resumes_exactly(tmp_path, photos):
    full = [b["key"] for b in _resampled(tmp_path, photos)]
    first = _resampled(tmp_path, photos)
    head = [b["key"] for b in _run(first, 13)]
    resumed = _resampled(tmp_path, photos)
    resumed.load_state_dict(first.state_dict())
    assert head + [b["key"] for b in resumed] == full


def test_digits_style_png_shards(tmp_path):
    """8x8 greyscale PNGs upscaled (the built-in demo's format) read as RGB."""
    import io
    import json

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "train-0.tar")) as tw:
        for i in range(12):
            img = Image.fromarray(rng.integers(0, 16, (8, 8), dtype=np.uint8) * 16, "L")
            buf = io.BytesIO()
            img.resize((32, 32), Image.Resampling.NEAREST).save(buf, "PNG")
            tw.write(
                {
                    "__key__": f"d{i:03d}",
                    "png": buf.getvalue(),
                    "txt": f"a digit {i % 10}",
                    "cls": str(i % 10),
                    "json": json.dumps({"label": i % 10}),
                }
            )
    (tmp_path / "sizes.json").write_text(json.dumps({"train-0.tar": 12}))
    c = DataConfig(train=str(tmp_path / "train-0.tar"), workers=0)
    loader = build_train_loader(
        c, tokenizer=toy_tokenizer, image_size=24, mean=MEAN, std=STD, batch_size=4, seed=0
    )
    batches = list(loader)
    assert len(batches) == 3 and loader.stats["corrupt_image"] == 0
    img = batches[0]["image"]
    assert img.shape == (4, 3, 24, 24)
    assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 1], img[:, 2])  # grey


def test_eval_loader_matches_open_clip_preprocess(shard_dir, photos):
    import io

    import open_clip
    from PIL import Image

    from clipkit.data import build_eval_loader

    m, s = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    loader = build_eval_loader(str(shard_dir / "{00000..00001}.tar"), 40, m, s, 7, workers=2)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(24)] and "caption" in batches[0]
    pre = open_clip.image_transform(40, is_train=False, mean=m, std=s)
    for b in batches[:2]:
        ref = torch.stack([pre(Image.open(io.BytesIO(photos[int(k)]))) for k in b["key"]])
        torch.testing.assert_close(b["image"], ref, atol=1e-5, rtol=0)
        assert b["cls"].tolist() == [int(k) % 10 for k in b["key"]]


def test_pipe_urls_read_like_local_files(shard_dir):
    """Any URL webdataset opens works; here ``pipe:cat`` (sizes come from data.num_samples)."""
    local = _loader(shard_dir, workers=0, batch=12, train=False)
    spec = "::".join(f"pipe:cat {shard_dir}/{i:05d}.tar" for i in range(8))
    c = DataConfig(train=spec, workers=2, num_samples=96, shuffle_buffer=8)
    piped = build_train_loader(
        c, tokenizer=toy_tokenizer, image_size=32, mean=MEAN, std=STD, batch_size=12, seed=3
    )
    assert piped.num_batches == 8
    keys = [k for b in piped for k in b["key"]]
    assert sorted(keys) == sorted(k for b in local for k in b["key"])


def test_eval_on_fewer_shards_than_readers_splits_samples(shard_dir):
    """2 ranks x 2 workers on 2 shards (24 samples): every sample once, balanced."""
    from clipkit.data import build_eval_loader

    per_rank = []
    for rank in range(2):
        loader = build_eval_loader(
            str(shard_dir / "{00000..00001}.tar"),
            16,
            MEAN,
            STD,
            5,
            workers=2,
            rank=rank,
            world_size=2,
        )
        per_rank.append([k for b in loader for k in b["key"]])
        assert loader.num_batches == 4  # 12 samples per rank: 6 per reader -> 2 batches each
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:06d}" for i in range(24)]
    assert len(per_rank[0]) == len(per_rank[1]) == 12


# -- elastic resume: a checkpoint of W x K readers continued on W' x K' ---------------------------


def _layout(shard_dir, world, workers, batch):
    return [
        _loader(shard_dir, rank=r, world=world, workers=workers, batch=batch, shuffle_buffer=16)
        for r in range(world)
    ]


def _by_key(batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: (b["image"][i], b["text"][i]) for b in batches for i, k in enumerate(b["key"])}


def _resume_on(states, shard_dir, world, workers, batch, stop=None):
    """Every rank of the new layout loads every saved rank's state; ``stop`` batches per rank."""
    loaders = _layout(shard_dir, world, workers, batch)
    got = []
    for loader in loaders:
        loader.load_state_dict(states)
        loader.set_epoch(0)  # the trainer calls this on resume: must not reset the position
        got.append(_run(loader, stop))
    steps = [len(g) for g in got]
    return loaders, [b for g in got for b in g], steps


@pytest.mark.parametrize(
    "old, new, stop",
    [
        ((2, 2, 4), (1, 2, 4), 4),  # 2 ranks x 2 workers -> 1 x 2: 64 samples left, 2 chunks
        ((1, 1, 4), (2, 1, 4), 4),  # 1 x 1 -> 2 x 1: one stream cut in two
        ((2, 2, 4), (2, 0, 4), 4),  # 2 x 2 -> 2 x 0 (in-process reading)
        ((2, 2, 4), (1, 0, 8), 2),  # and the batch size doubles (global batch 16 -> 8)
    ],
)
def test_elastic_resume_reads_every_sample_once(shard_dir, old, new, stop):
    """8 shards x 12 samples, sizes chosen so that no partial batch is dropped: the keys before
    and after the change of layout are the 96 samples, each once; every sample's crop and
    caption tokens equal the uninterrupted run's (its stream and position seed them)."""
    ref = _by_key([b for loader in _layout(shard_dir, *old) for b in loader])
    assert len(ref) == 96
    first = _layout(shard_dir, *old)
    head = [b for loader in first for b in _run(loader, stop)]
    states = [loader.state_dict() for loader in first]
    loaders, tail, steps = _resume_on(states, shard_dir, *new)
    assert len(set(steps)) == 1 and steps[0] == loaders[0].num_batches  # equal steps per rank
    keys = [k for b in head + tail for k in b["key"]]
    assert len(keys) == len(set(keys)) == 96
    for k, (image, text) in _by_key(head + tail).items():
        assert torch.equal(image, ref[k][0]) and torch.equal(text, ref[k][1]), k
    nxt = []
    for loader in loaders:  # the next epoch is planned on the new layout: all 96 again
        loader.set_epoch(1)
        nxt += [k for b in loader for k in b["key"]]
    assert sorted(nxt) == sorted(keys)


def test_elastic_resume_twice_in_one_epoch(shard_dir):
    """2 x 2 -> 1 x 2 (batch 4) -> 2 x 0 (batch 2): still every sample once."""
    first = _layout(shard_dir, 2, 2, 4)
    head = [b for loader in first for b in _run(loader, 4)]
    states = [loader.state_dict() for loader in first]
    mid_loaders, mid, _ = _resume_on(states, shard_dir, 1, 2, 4, stop=6)
    state_mid = mid_loaders[0].state_dict()
    assert state_mid["pieces"] is not None
    # On the same layout again, its own state (pieces included) resumes exactly.
    again = _layout(shard_dir, 1, 2, 4)[0]
    again.load_state_dict(state_mid)
    assert [b["key"] for b in again] == [b["key"] for b in mid_loaders[0]]
    _, tail, steps = _resume_on([state_mid], shard_dir, 2, 0, 2)
    keys = [k for b in head + mid + tail for k in b["key"]]
    assert len(keys) == len(set(keys)) == 96
    assert steps == [10, 10]  # 40 samples left, 20 per rank, batches of 2


def test_elastic_resume_refuses_another_seed_in_one_line(shard_dir):
    first = _layout(shard_dir, 2, 2, 4)
    for loader in first:
        _run(loader, 2)
    states = [loader.state_dict() for loader in first]
    other = build_train_loader(
        DataConfig(train=str(shard_dir / "{00000..00007}.tar"), workers=0),
        tokenizer=toy_tokenizer,
        image_size=32,
        mean=MEAN,
        std=STD,
        batch_size=4,
        seed=4,
    )
    with pytest.raises(ValueError, match="saved seed=3 but this run has seed=4"):
        other.load_state_dict(states)
    # One rank's state alone cannot continue on another layout: named, not silently wrong.
    one = _loader(shard_dir, workers=2, batch=4)
    with pytest.raises(ValueError, match="world_size=2 but this run has world_size=1"):
        one.load_state_dict(states[0])


def test_elastic_resume_at_the_end_of_an_epoch_starts_the_next(shard_dir):
    """A checkpoint after the epoch's last batch (before the loader noticed its end): on another
    layout the epoch yields nothing more, and the next epoch is whole."""
    first = _layout(shard_dir, 2, 2, 4)
    for loader in first:
        assert len(_run(loader, loader.num_batches)) == 12
    states = [loader.state_dict() for loader in first]
    loaders, tail, steps = _resume_on(states, shard_dir, 1, 0, 4)
    assert tail == [] and steps == [0] and loaders[0].num_batches == 0
    loaders[0].set_epoch(1)
    assert loaders[0].num_batches == 24 and len({k for b in loaders[0] for k in b["key"]}) == 96
