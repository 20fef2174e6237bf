"""Linear probes: --C c is scikit-learn's LogisticRegression(C=c, max_iter=1000); the searches are
deterministic and on their grids; the torch probe runs on the CPU; the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_cuts import cifar_cuts, cut_imagefolder_tar
from sklearn.linear_model import LogisticRegression

from clipkit.cli import main
from clipkit.eval.features import extract_features
from clipkit.eval.linear_probe import (
    C_GRID,
    WD_GRID,
    cb_probe,
    clip_probe,
    holdout_split,
    peak_search,
)

TINY = "open_clip:clipkit-tiny"


def _blobs(n: int, m: int, d: int, c: int, seed: int, spread: float = 1.5):
    """L2-normalised Gaussian blobs: a learnable but not separable task."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    y, yt = rng.integers(0, c, size=n), rng.integers(0, c, size=m)
    x = centres[y] + spread * rng.normal(size=(n, d))
    xt = centres[yt] + spread * rng.normal(size=(m, d))
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(x), y, unit(xt), yt


@pytest.mark.parametrize(("c", "classes"), [(0.1, 10), (3.16, 10), (1.0, 2), (100.0, 4)])
def test_fixed_c_is_sklearn(c, classes) -> None:
    x, y, xt, yt = _blobs(300, 120, 16, classes, seed=classes)
    res = clip_probe(x, y, xt, num_classes=classes, c=c)
    sk = LogisticRegression(C=c, max_iter=1000).fit(x, y)
    np.testing.assert_array_equal(res.topk[:, 0], sk.predict(xt))
    assert (res.topk[:, 0] == yt).mean() == sk.score(xt, yt)
    assert res.value == c and res.search == []
    assert res.topk.shape == (120, min(5, classes))


def test_search_is_deterministic_and_on_the_grid() -> None:
    x, y, xt, _ = _blobs(400, 50, 16, 5, seed=3)
    a = clip_probe(x, y, xt, num_classes=5, seed=1)
    b = clip_probe(x, y, xt, num_classes=5, seed=1)
    assert a.value == b.value and a.search == b.search
    np.testing.assert_array_equal(a.topk, b.topk)
    assert a.value in C_GRID.tolist()
    # The CLIP paper's search: 7 starting points (every second decade), then at most 2 per
    # halving (8, 4, 2, 1 grid steps); the chosen C has the best held-out accuracy seen.
    tried = [v for v, _ in a.search]
    assert tried[:7] == C_GRID[::16].tolist() and len(tried) <= 15 and len(set(tried)) == len(tried)
    assert dict(a.search)[a.value] == max(acc for _, acc in a.search)


def test_peak_search_finds_a_unimodal_peak_and_ties_go_first() -> None:
    for peak in (0, 5, 37, 48, 96):
        calls: list[int] = []

        def score(i: int, p: int = peak, calls: list[int] = calls) -> float:
            calls.append(i)
            return -abs(i - p)

        best, order = peak_search(score, 97)
        assert best == peak and order == calls and len(calls) <= 15
    assert peak_search(lambda i: 1.0, 97)[0] == 0  # all equal: the first candidate


def test_holdout_split_is_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    fit, val = holdout_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
    assert [int((labels[val] == c).sum()) for c in range(4)] == [2, 1, 1, 0]
    assert set(labels[fit]) == {0, 1, 2, 3}  # every class stays on the fit side
    f2, v2 = holdout_split(labels, 0.2, seed=0)
    assert np.array_equal(fit, f2) and np.array_equal(val, v2)
    assert not np.array_equal(val, holdout_split(labels, 0.2, seed=1)[1])
    with pytest.raises(ValueError, match="held-out fraction"):
        holdout_split(labels, 1.0, seed=0)


def test_cb_probe_on_cpu_learns_and_is_deterministic() -> None:
    x, y, xt, yt = _blobs(300, 200, 16, 4, seed=0, spread=0.5)
    args = (torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xt))
    state = torch.random.get_rng_state()
    a = cb_probe(*args, num_classes=4, weight_decay=0.0, epochs=3, batch_size=32)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    b = cb_probe(*args, num_classes=4, weight_decay=0.0, epochs=3, batch_size=32)
    np.testing.assert_array_equal(a.topk, b.topk)
    assert (a.topk[:, 0] == yt).mean() > 0.9
    # The search: the same rule on the weight-decay grid, chosen deterministically.
    s1 = cb_probe(*args, num_classes=4, epochs=1, batch_size=64)
    s2 = cb_probe(*args, num_classes=4, epochs=1, batch_size=64)
    assert s1.value == s2.value and s1.value in WD_GRID.tolist() and s1.search == s2.search


# --------------------------------------------------------------------------- real CIFAR-10
@pytest.fixture(scope="module")
def cuts(data_root, tmp_path_factory) -> tuple[Path, Path]:
    """20 train and 10 test images per class, cut from the real CIFAR-10 tars."""
    return cifar_cuts(data_root, tmp_path_factory.mktemp("cifar"), train=20, test=10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature cache for the CLI tests: the tiny model's features are extracted once."""
    return tmp_path_factory.mktemp("features")


def test_fixed_c_is_sklearn_on_cifar_features(micro_model, cuts) -> None:
    tr = extract_features(micro_model, str(cuts[0]), batch_size=100)
    te = extract_features(micro_model, str(cuts[1]), batch_size=100)
    x, y, xt, yt = tr.feats.numpy(), tr.labels.numpy(), te.feats.numpy(), te.labels.numpy()
    res = clip_probe(x, y, xt, num_classes=10, c=0.5)
    sk = LogisticRegression(C=0.5, max_iter=1000).fit(x, y)
    np.testing.assert_array_equal(res.topk[:, 0], sk.predict(xt))
    assert (res.topk[:, 0] == yt).mean() == sk.score(xt, yt)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["eval", *argv, "--no-progress", "--workers", "0", "--device", "cpu"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_clip_fixed_c_equals_sklearn(cuts, cache, tmp_path, capsys) -> None:
    train_tar, test_tar = cuts
    out = tmp_path / "lp.json"
    rc, stdout, _ = _run(capsys, "linear-probe", "--model", TINY, "--train", str(train_tar),
                         "--data", str(test_tar), "--protocol", "clip", "--C", "0.5",
                         "--cache-dir", str(cache), "--output", str(out))  # fmt: skip
    assert rc == 0 and "acc1=" in stdout
    res = json.loads(out.read_text())
    assert res["task"] == "linear_probe" and res["protocol"] == "clip" and res["C"] == 0.5
    assert isinstance(res["converged"], bool)
    assert set(res["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert (res["n_samples"], res["n_train"], res["n_classes"]) == (100, 200, 10)
    from clipkit.models.load import load_model

    model = load_model(TINY)[0].eval()
    tr = extract_features(model, str(train_tar), cache_dir=cache)
    te = extract_features(model, str(test_tar), cache_dir=cache)
    assert tr.cached and te.cached
    sk = LogisticRegression(C=0.5, max_iter=1000).fit(tr.feats.numpy(), tr.labels.numpy())
    assert res["metrics"]["acc1"] == sk.score(te.feats.numpy(), te.labels.numpy())


def test_cli_searches_and_cb(cuts, cache, tmp_path, capsys) -> None:
    train_tar, test_tar = cuts
    base = ("linear-probe", "--model", TINY, "--train", str(train_tar), "--data", str(test_tar),
            "--cache-dir", str(cache), "--output", str(tmp_path / "lp.json"))  # fmt: skip
    assert _run(capsys, *base, "--protocol", "clip")[0] == 0
    res = json.loads((tmp_path / "lp.json").read_text())
    assert res["searched"] and res["C"] in C_GRID.tolist() and len(res["search"]) >= 7
    assert _run(capsys, *base, "--protocol", "cb", "--weight-decay", "0", "--epochs", "2")[0] == 0
    res = json.loads((tmp_path / "lp.json").read_text())
    assert res["protocol"] == "cb" and res["weight_decay"] == 0.0 and not res["searched"]
    assert 0 <= res["metrics"]["acc1"] <= 1


def test_bad_inputs_are_one_line_exit_2(data_root, cuts, tmp_path, capsys) -> None:
    train_tar, test_tar = cuts
    nine = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"}
    train9 = cut_imagefolder_tar(data_root / "cifar10" / "train.tar", tmp_path / "t9.tar", 2, nine)
    base = ("linear-probe", "--model", TINY, "--train", str(train9), "--data", str(test_tar))
    rc, _, err = _run(capsys, *base)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "different class sets" in err and "only in TEST: truck" in err
    base = ("linear-probe", "--model", TINY, "--train", str(train_tar), "--data", str(test_tar))
    for extra, msg in (
        (("--protocol", "cb", "--C", "1"), "--C applies to --protocol clip"),
        (("--C", "0"), "--C must be > 0"),
        (("--holdout", "1.5"), "--holdout must be in (0, 1)"),
    ):
        rc, _, err = _run(capsys, *base, *extra)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and msg in err, err


_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from clipkit.config.schema import ModelConfig
from clipkit.eval.driver import evaluate
from clipkit.eval.linear_probe_cli import EVALUATOR, ProbeOptions
from clipkit.models import build_dual_encoder

train, test, cfg, out = sys.argv[1:]
acc = Accelerator(cpu=True)
torch.manual_seed(0)
model = build_dual_encoder(ModelConfig(name=cfg)).eval()
rep = evaluate(EVALUATOR, model, test, ProbeOptions(train=train, c=0.5), accelerator=acc,
               batch_size=32)
json.dump({"metrics": rep.metrics, "C": rep.outcome.details["C"]},
          open(f"{out}{acc.process_index}", "w"))
"""


def test_two_processes_equal_one(micro_model, cuts, tmp_path, torchrun) -> None:
    """Both ranks report the probe that rank 0 fitted on the gathered features."""
    from clipkit.eval.driver import evaluate
    from clipkit.eval.linear_probe_cli import EVALUATOR, ProbeOptions

    train_tar, test_tar = cuts
    cfg = str(Path(__file__).with_name("micro_clip.json"))
    (tmp_path / "run.py").write_text(_SCRIPT)
    torchrun(tmp_path / "run.py", train_tar, test_tar, cfg, tmp_path / "rank")
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    one = evaluate(EVALUATOR, micro_model, str(test_tar), ProbeOptions(train=str(train_tar), c=0.5),
                   device="cpu", batch_size=32)  # fmt: skip
    assert ranks[0] == ranks[1] == {"metrics": one.metrics, "C": 0.5}
