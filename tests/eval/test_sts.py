"""STS readers, Spearman and SentEval-style aggregation, and the ``clipkit eval sts`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipkit.eval.sts import (
    StsSet,
    load_sts,
    read_senteval,
    spearman,
    sts_scores,
)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("n,levels", [(50, 5), (1000, 1000), (40, 2)])
def test_spearman_matches_scipy_with_ties(n, levels):
    rng = np.random.default_rng(n)
    a = rng.integers(0, levels, n).astype(float)
    b = a + rng.normal(0, levels / 3, n).round(1)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b)[0], abs=1e-12)


def test_spearman_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        spearman([1.0, 2.0], [1.0])


def _bag_encoder(sentences: list[str]) -> torch.Tensor:
    """Deterministic stand-in encoder: letter counts (similar strings -> similar vectors)."""
    out = torch.zeros(len(sentences), 26)
    for i, s in enumerate(sentences):
        for ch in s.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out + 1e-3


def _cos(a: str, b: str) -> float:
    x, y = _bag_encoder([a, b])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def test_aggregates_follow_senteval():
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "tree", "rain", "bird", "milk", "road"]
    sets = []
    for name, n in (("a", 30), ("b", 12), ("c", 50)):
        s1 = [" ".join(rng.choice(words, 3)) for _ in range(n)]
        s2 = [" ".join(rng.choice(words, 3)) for _ in range(n)]
        sets.append(StsSet(name, s1, s2, list(rng.uniform(0, 5, n).round(1))))
    res = sts_scores(_bag_encoder, sets)
    per, sys_all, gold_all = [], [], []
    for s in sets:
        sys = [_cos(a, b) for a, b in zip(s.sentences1, s.sentences2)]
        ref = 100 * scipy_stats.spearmanr(sys, s.scores)[0]
        assert res["spearman"][s.name] == pytest.approx(ref, abs=1e-4)
        per.append(ref)
        sys_all += sys
        gold_all += s.scores
    sizes = [30, 12, 50]
    assert res["n_pairs"] == dict(zip("abc", sizes))
    assert res["mean"] == pytest.approx(np.mean(per), abs=1e-4)
    assert res["wmean"] == pytest.approx(np.average(per, weights=sizes), abs=1e-4)
    assert res["all"] == pytest.approx(100 * scipy_stats.spearmanr(sys_all, gold_all)[0], abs=1e-4)


def test_senteval_layout_drops_unscored(tmp_path):
    (tmp_path / "STS.input.news.txt").write_text("a b\tc d\ne f\tg h\ni j\tk l\n")
    (tmp_path / "STS.gs.news.txt").write_text("4.0\n\n1.5\n")
    (tmp_path / "readme.txt").write_text("not an STS file\n")
    s = read_senteval(tmp_path / "STS.input.news.txt", tmp_path / "STS.gs.news.txt")
    assert (s.name, s.sentences1, s.sentences2, s.scores) == (
        "news",
        ["a b", "i j"],
        ["c d", "k l"],
        [4.0, 1.5],
    )
    sets = load_sts(tmp_path)
    assert [x.name for x in sets] == ["news"]


def test_real_layouts(data_root):
    stsb = load_sts(data_root / "sts" / "stsbenchmark")
    assert {s.name: len(s) for s in stsb} == {"sts-dev": 1500, "sts-test": 1379, "sts-train": 5749}
    sick = load_sts(data_root / "sts" / "sick2014")
    sizes = {s.name: len(s) for s in sick}
    assert sizes == {"SICK_test_annotated": 4927, "SICK_train": 4500, "SICK_trial": 500}
    test = next(s for s in stsb if s.name == "sts-test")
    assert test.scores[0] == 2.5 and test.sentences1[0] == "A girl is styling her hair."


def test_bad_inputs_name_file_and_line(tmp_path):
    bad = tmp_path / "sts-x.csv"
    bad.write_text("g\tf\t2012\t1\t3.0\ta\tb\ng\tf\t2012\t2\tfive\ta\tb\n")
    with pytest.raises(ValueError, match=r"sts-x.csv:2: gold score 'five'"):
        load_sts(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sts(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no STS files"):
        load_sts(tmp_path / "empty")
    (tmp_path / "STS.input.x.txt").write_text("a\tb\n")
    (tmp_path / "STS.gs.x.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match="has 1 lines but"):
        read_senteval(tmp_path / "STS.input.x.txt", tmp_path / "STS.gs.x.txt")


def test_cli_writes_json_and_fails_in_one_line(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "train"))
    from simcse_helpers import tiny_bert, write_sts

    from clipkit.cli import main

    model = tiny_bert(tmp_path / "bert")
    data = tmp_path / "sts"
    data.mkdir()
    write_sts(
        data / "sts-a.csv",
        [
            (5.0, "a man runs", "a man is running"),
            (0.0, "a cat", "the stock fell"),
            (2.0, "dogs bark", "a dog sleeps"),
        ],
    )
    write_sts(
        data / "sts-b.csv",
        [(1.0, "x y", "y z"), (3.0, "red car", "a red car"), (4.5, "hi", "hello")],
    )
    out = tmp_path / "out.json"
    assert (
        main(["eval", "sts", "--model", str(model), "--data", str(data), "--output", str(out)]) == 0
    )
    res = json.loads(out.read_text())
    assert set(res["metrics"]["spearman"]) == {"sts-a", "sts-b"}
    assert {"all", "mean", "wmean"} <= set(res["metrics"]) and res["pooling"] == "mean"
    capsys.readouterr()
    assert main(["eval", "sts", "--model", str(model), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
