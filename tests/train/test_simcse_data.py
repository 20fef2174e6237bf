"""SimCSE data: formats, deterministic rank-sharded batches, exact resume, hard-negative mining."""

from __future__ import annotations

import pytest
import torch

from clipkit.data.sentences import (
    SentenceBatches,
    SentenceRows,
    mine_hard_negatives,
    read_sentences,
)


def _fake_tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids = the row index written in the text (enough to trace rows through batches)."""
    ids = torch.tensor([[int(t.split()[-1])] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _rows(n: int, negatives: bool = True) -> SentenceRows:
    return SentenceRows(
        [f"anchor {i}" for i in range(n)],
        [f"pos {i}" for i in range(n)],
        [[f"neg {i}" for i in range(n)]] if negatives else [],
    )


def test_formats(tmp_path, data_root):
    sup = read_sentences(data_root / "nli" / "snli_dev_triplets.csv")
    assert len(sup) == 2943 and len(sup.columns) == 3
    assert sup.anchors[0].startswith("Two women are embracing")
    # 11,914 newlines, and a last line without one: 11,915 sentences.
    unsup = read_sentences(data_root / "wiki" / "wiki1m_for_simcse_head.txt")
    assert len(unsup) == 11915 and unsup.columns[0] is unsup.columns[1]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('sent0,sent1\n"a, b",c\n')
    assert read_sentences(pairs).columns == [["a, b"], ["c"]]


@pytest.mark.parametrize(
    "text,match",
    [
        ("s0,s1\na,b\n", "header must be"),
        ("sent0,sent1,hard_neg\na,b,c\nd,,f\n", r"bad.csv:3: expected 3 non-empty"),
        ("sent0,sent1\n", "no data rows"),
    ],
)
def test_bad_csv(tmp_path, text, match):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        read_sentences(tmp_path / "bad.csv")


def test_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train not found"):
        read_sentences(tmp_path / "x.txt")
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no sentences"):
        read_sentences(tmp_path / "e.txt")


def test_layout_column_major_and_drop_last():
    data = SentenceBatches(_rows(10), _fake_tokenize, batch_size=4, seed=3)
    assert data.num_batches == 2
    batches = list(data)
    assert len(batches) == 2
    for b in batches:
        rows = [int(k) for k in b["key"]]
        assert b["input_ids"].view(-1).tolist() == rows * 3  # anchors, positives, negatives
    assert len({k for b in batches for k in b["key"]}) == 8


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_global_batch(world):
    one = SentenceBatches(_rows(50), _fake_tokenize, batch_size=4 * world, seed=1)
    ranks = [SentenceBatches(_rows(50), _fake_tokenize, 4, 1, r, world) for r in range(world)]
    for epoch in (0, 1):
        for d in (one, *ranks):
            d.set_epoch(epoch)
        ref = [b["key"] for b in one]
        got = [sum(keys, []) for keys in zip(*[[b["key"] for b in d] for d in ranks])]
        assert got == ref and len(ref) == one.num_batches == ranks[0].num_batches
    fresh = [b["key"] for b in SentenceBatches(_rows(50), _fake_tokenize, 4 * world, 1)]
    one.set_epoch(0)
    epoch0 = [b["key"] for b in one]
    assert fresh == epoch0 != ref  # deterministic from (seed, epoch); epochs differ


def test_exact_resume():
    full = SentenceBatches(_rows(40), _fake_tokenize, batch_size=4, seed=7)
    full.set_epoch(2)
    ref = [b["key"] for b in full]
    part = SentenceBatches(_rows(40), _fake_tokenize, batch_size=4, seed=7)
    part.set_epoch(2)
    it = iter(part)
    seen = [next(it)["key"] for _ in range(3)]
    state = part.state_dict()
    assert state == {"epoch": 2, "position": 3}
    resumed = SentenceBatches(_rows(40), _fake_tokenize, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert seen + [b["key"] for b in resumed] == ref


def _onehot_encoder(vocab: list[str]):
    """Bag-of-words embeddings: sentences sharing words are similar."""

    def encode(sentences: list[str]) -> torch.Tensor:
        out = torch.zeros(len(sentences), len(vocab))
        for i, s in enumerate(sentences):
            for w in s.split():
                out[i, vocab.index(w)] += 1.0
        return out

    return encode


def test_mining_nearest_below_ceiling():
    vocab = ["red", "blue", "car", "boat", "big", "old"]
    rows = SentenceRows(
        ["red car", "old boat", "big red"],
        ["red car big", "blue boat old", "big old car"],
    )
    enc = _onehot_encoder(vocab)
    mined, stats = mine_hard_negatives(rows, enc, k=1, max_sim=0.99)
    assert stats == {"mined": 3, "fallback": 0}
    # Nearest pool sentence that is not the row's own positive.
    assert mined.negatives == [["big old car", "big old car", "red car big"]]
    # A ceiling below the nearest similarity skips it (false-negative guard).
    e = torch.nn.functional.normalize(enc(["red car", "big old car", "blue boat old"]), dim=-1)
    near, far = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert far < near
    capped, _ = mine_hard_negatives(rows, enc, k=1, max_sim=(near + far) / 2)
    assert capped.negatives[0][0] == "blue boat old"
    two, _ = mine_hard_negatives(rows, enc, k=2, max_sim=1.0)
    assert len(two.columns) == 4 and all(len(c) == 3 for c in two.columns)
    with pytest.raises(ValueError, match="mine_max_sim"):
        mine_hard_negatives(rows, enc, k=1, max_sim=1.5)


def test_mining_falls_back_when_everything_is_too_similar():
    rows = SentenceRows(["a", "a b", "b", "b a"])  # unsupervised
    enc = _onehot_encoder(["a", "b"])
    mined, stats = mine_hard_negatives(rows, enc, k=1, max_sim=-0.5)
    assert stats["fallback"] == 4 and len(mined.negatives[0]) == 4
