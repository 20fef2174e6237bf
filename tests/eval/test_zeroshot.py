"""Zero-shot classifier and metrics against naive references, on one process and two."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_fakes import KeyedTextModel
from sklearn.metrics import balanced_accuracy_score

from clipkit.eval import build_zeroshot_classifier, zero_shot
from clipkit.eval.zeroshot import classification_metrics, confusion_matrix, per_class_recall

CLASSES = ["cat", "dog", "bird", "fish", "horse", "frog"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "{}"]


def _naive_classifier(model, classnames, templates) -> torch.Tensor:
    # One class at a time, as CLIP's notebook and CLIP_benchmark do.
    cols = []
    with torch.no_grad():
        for c in classnames:
            e = model.encode_text(model.tokenize([t.format(c) for t in templates]))
            m = F.normalize(e, dim=-1).mean(0)
            cols.append(m / m.norm())
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("batch_size", [3, 256])
def test_classifier_matches_per_class_reference(tiny_model, batch_size: int) -> None:
    clf = build_zeroshot_classifier(tiny_model, CLASSES, TEMPLATES, batch_size=batch_size)
    assert clf.shape == (tiny_model.embed_dim, len(CLASSES))
    torch.testing.assert_close(clf.norm(dim=0), torch.ones(len(CLASSES)))
    ref = _naive_classifier(tiny_model, CLASSES, TEMPLATES)
    torch.testing.assert_close(clf, ref, atol=1e-6, rtol=1e-5)


def _images_for(model: KeyedTextModel, labels: np.ndarray, noise: float, seed: int) -> torch.Tensor:
    clf = build_zeroshot_classifier(model, CLASSES, TEMPLATES)  # (D, C)
    g = torch.Generator().manual_seed(seed)
    x = clf.t()[torch.as_tensor(labels)]  # (N, D)
    return x + noise * torch.randn(x.shape, generator=g)


def _naive_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    y = torch.as_tensor(labels)
    top5 = logits.topk(5, dim=1).indices
    return {
        "acc1": (logits.argmax(1) == y).double().mean().item(),
        "acc5": (top5 == y[:, None]).any(1).double().mean().item(),
        "mean_per_class_recall": balanced_accuracy_score(labels, logits.argmax(1).numpy()),
    }


def test_zero_shot_metrics_match_naive(keyed_model) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), size=203)
    images = _images_for(keyed_model, labels, noise=0.35, seed=1)  # some mistakes
    batches = [(images[i : i + 16], torch.as_tensor(labels[i : i + 16])) for i in range(0, 203, 16)]
    out = zero_shot(keyed_model, batches, CLASSES, TEMPLATES)
    clf = build_zeroshot_classifier(keyed_model, CLASSES, TEMPLATES)
    ref = _naive_metrics(F.normalize(images, dim=-1) @ clf, labels)
    assert out["n"] == 203
    assert 0.2 < out["acc1"] < 0.95  # the noise makes this a real test of the counting
    for k, v in ref.items():
        assert out[k] == pytest.approx(v, abs=1e-9), k


def test_dict_batches_skipped_and_per_class(keyed_model) -> None:
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    images = _images_for(keyed_model, labels, noise=0.0, seed=0)
    batches = [
        {"image": images[:5], "cls": torch.as_tensor(labels[:5]), "skipped": 2},
        {"image": images[5:], "cls": labels[5:].tolist(), "skipped": 1},
    ]
    out = zero_shot(keyed_model, batches, CLASSES, TEMPLATES, per_class=True)
    assert out["acc1"] == 1.0 and out["acc5"] == 1.0 and out["skipped"] == 3
    assert all(out[f"recall/{c}"] == 1.0 for c in CLASSES)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_few_classes_and_missing_classes() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=50)  # classes 3 and 4 never occur
    logits = torch.as_tensor(rng.normal(size=(50, 5)))
    topk = logits.topk(5, dim=1).indices.numpy()
    out = classification_metrics(topk, labels, 5)
    assert out["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(labels, topk[:, 0]), abs=1e-12
    )
    three = classification_metrics(topk[:, :3] % 3, labels, 3)
    assert "acc5" not in three
    recall, _ = per_class_recall(topk[:, 0], labels, 5)
    assert np.isnan(recall[3]) and np.isnan(recall[4])
    cm = confusion_matrix(topk[:, 0], labels, 5)
    assert cm.sum() == 50 and np.trace(cm) == int((topk[:, 0] == labels).sum())


def test_bad_inputs(keyed_model) -> None:
    img = _images_for(keyed_model, np.array([0, 1]), 0.0, 0)
    with pytest.raises(ValueError, match="label 7 is outside the 6 class names"):
        zero_shot(keyed_model, [(img, torch.tensor([0, 7]))], CLASSES, TEMPLATES)
    with pytest.raises(ValueError, match="yielded no images"):
        zero_shot(keyed_model, [], CLASSES, TEMPLATES)
    with pytest.raises(ValueError, match="no '\\{\\}' placeholder"):
        zero_shot(keyed_model, [(img, torch.tensor([0, 1]))], CLASSES, ["a photo"])
