"""kNN: the rule against a plain numpy version, the CLI end to end, one-line errors, 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_cuts import cifar_cuts, cut_imagefolder_tar

from clipkit.cli import main
from clipkit.eval.features import extract_features
from clipkit.eval.knn import knn_classify

TINY = "open_clip:clipkit-tiny"


def knn_reference(
    train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, t: float, c: int
) -> np.ndarray:
    """InstDisc's weighted kNN, one test row at a time, ties to the lower index (stable sorts)."""
    out = []
    for q in test:
        sim = train @ q  # (N,)
        near = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(c)
        np.add.at(votes, labels[near], np.exp(sim[near] / t))
        out.append(np.argsort(-votes, kind="stable")[: min(5, c)])
    return np.array(out)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("n", "m", "d", "c", "k", "t", "chunk"),
    [
        (200, 50, 16, 10, 20, 0.07, 7),
        (120, 33, 8, 3, 200, 0.5, 1024),  # k > N: every training row votes; C < 5
        (64, 40, 4, 7, 1, 0.1, 16),  # k = 1: the nearest neighbour's class
        (300, 17, 32, 100, 50, 0.07, 5),
    ],
)
def test_equals_numpy_rule_random(n, m, d, c, k, t, chunk) -> None:
    rng = np.random.default_rng(n + m)
    train, test = _unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(m, d)))
    labels = rng.integers(0, c, size=n)
    got = knn_classify(
        torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test),
        k=k, temperature=t, num_classes=c, chunk=chunk,
    )  # fmt: skip
    np.testing.assert_array_equal(got.numpy(), knn_reference(train, labels, test, k, t, c))


def test_ties_go_to_lower_indices() -> None:
    # Rows 0..3 are one vector with labels 2, 1, 0, 1 and row 4 is farther: with k = 2 the rule
    # takes rows 0 and 1 (classes 2 and 1, equal votes), so class 1 ranks first, then 2.
    v = np.array([1.0, 0.0])
    train = np.stack([v, v, v, v, _unit(np.array([[1.0, 1.0]]))[0]])
    labels = np.array([2, 1, 0, 1, 0])
    got = knn_classify(
        torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(v[None]),
        k=2, temperature=0.07, num_classes=3, chunk=1,
    )  # fmt: skip
    assert got.tolist() == [[1, 2, 0]]
    assert got.tolist() == knn_reference(train, labels, v[None], 2, 0.07, 3).tolist()


def test_bad_arguments_raise() -> None:
    x, y = torch.eye(3), torch.tensor([0, 1, 2])
    for kw, msg in (
        (dict(k=0), "k must be"),
        (dict(temperature=0.0), "temperature must be"),
        (dict(chunk=0), "chunk must be"),
        (dict(num_classes=2), r"train labels must lie in \[0, 2\)"),
    ):
        with pytest.raises(ValueError, match=msg):
            knn_classify(x, y, x, **{"num_classes": 3, **kw})
    with pytest.raises(ValueError, match="differ in dimension"):
        knn_classify(x, y, torch.eye(2), num_classes=3)


# --------------------------------------------------------------------------- real CIFAR-10
@pytest.fixture(scope="module")
def cuts(data_root, tmp_path_factory) -> tuple[Path, Path]:
    """20 train and 10 test images per class, cut from the real CIFAR-10 tars."""
    return cifar_cuts(data_root, tmp_path_factory.mktemp("cifar"), train=20, test=10)


def test_equals_numpy_rule_on_cifar_features(micro_model, cuts) -> None:
    train_tar, test_tar = cuts
    tr = extract_features(micro_model, str(train_tar), batch_size=100)
    te = extract_features(micro_model, str(test_tar), batch_size=100)
    assert tr.feats.shape == (200, 64) and te.feats.shape == (100, 64)
    torch.testing.assert_close(tr.feats.norm(dim=1), torch.ones(200))
    ref = knn_reference(
        tr.feats.double().numpy(), tr.labels.numpy(), te.feats.double().numpy(), 50, 0.07, 10
    )
    for dtype in (torch.float64, torch.float32):
        got = knn_classify(
            tr.feats.to(dtype), tr.labels, te.feats.to(dtype), k=50, num_classes=10, chunk=32
        )
        np.testing.assert_array_equal(got.numpy(), ref)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["eval", *argv, "--no-progress", "--workers", "0", "--device", "cpu"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_writes_json_equal_to_library(cuts, tmp_path, capsys) -> None:
    train_tar, test_tar = cuts
    out, cache = tmp_path / "knn.json", tmp_path / "cache"
    argv = ("knn", "--model", TINY, "--train", str(train_tar), "--data", str(test_tar),
            "--k", "20", "--cache-dir", str(cache), "--output", str(out))  # fmt: skip
    rc, stdout, _ = _run(capsys, *argv)
    assert rc == 0 and "acc1=" in stdout
    res = json.loads(out.read_text())
    assert res["task"] == "knn_classification"
    assert set(res["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert (res["n_samples"], res["n_train"], res["n_classes"]) == (100, 200, 10)
    assert (res["k"], res["temperature"]) == (20, 0.07)
    # The library on the cached features gives the JSON's numbers.
    from clipkit.models.load import load_model

    model = load_model(TINY)[0].eval()
    tr = extract_features(model, str(train_tar), cache_dir=cache)
    te = extract_features(model, str(test_tar), cache_dir=cache)
    assert tr.cached and te.cached
    pred = knn_classify(tr.feats, tr.labels, te.feats, k=20, num_classes=10)[:, 0]
    assert res["metrics"]["acc1"] == pytest.approx((pred == te.labels).float().mean().item())
    # A second run reads the cache and reports the same.
    rc, _, _ = _run(capsys, *argv)
    assert rc == 0 and json.loads(out.read_text())["metrics"] == res["metrics"]


def test_class_set_mismatch_is_one_line_exit_2(data_root, cuts, tmp_path, capsys) -> None:
    train_tar, _ = cuts
    nine = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"}
    test9 = cut_imagefolder_tar(data_root / "cifar10" / "test.tar", tmp_path / "t9.tar", 2, nine)
    rc, _, err = _run(capsys, "knn", "--model", TINY, "--train", str(train_tar),
                      "--data", str(test9))  # fmt: skip
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err  # before the model loads: no other line
    assert "different class sets" in err and "only in TRAIN: truck" in err


def test_bad_k_is_one_line_exit_2(cuts, capsys) -> None:
    train_tar, test_tar = cuts
    rc, _, err = _run(capsys, "knn", "--model", TINY, "--train", str(train_tar),
                      "--data", str(test_tar), "--k", "0")  # fmt: skip
    assert rc == 2 and err.strip() == "clipkit eval knn: error: --k must be >= 1 (got 0)"


# --------------------------------------------------------------------------- 2 processes
_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from clipkit.config.schema import ModelConfig
from clipkit.eval.driver import evaluate
from clipkit.eval.knn_cli import EVALUATOR, KnnOptions
from clipkit.models import build_dual_encoder

train, test, cfg, out = sys.argv[1:]
acc = Accelerator(cpu=True)
torch.manual_seed(0)
model = build_dual_encoder(ModelConfig(name=cfg)).eval()
rep = evaluate(EVALUATOR, model, test, KnnOptions(train=train, k=20), accelerator=acc,
               batch_size=32)
if acc.is_main_process:
    json.dump({"metrics": rep.metrics, "counts": rep.outcome.counts}, open(out, "w"))
"""


def test_two_processes_equal_one(micro_model, cuts, tmp_path, torchrun) -> None:
    from clipkit.eval.driver import evaluate
    from clipkit.eval.knn_cli import EVALUATOR, KnnOptions

    train_tar, test_tar = cuts
    cfg = str(Path(__file__).with_name("micro_clip.json"))
    (tmp_path / "run.py").write_text(_SCRIPT)
    torchrun(tmp_path / "run.py", train_tar, test_tar, cfg, tmp_path / "two.json")
    two = json.loads((tmp_path / "two.json").read_text())
    one = evaluate(EVALUATOR, micro_model, str(test_tar), KnnOptions(train=str(train_tar), k=20),
                   device="cpu", batch_size=32)  # fmt: skip
    assert two["metrics"] == one.metrics
    assert two["counts"] == one.outcome.counts
