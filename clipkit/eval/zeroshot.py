"""Zero-shot classification: a text-built classifier applied to normalised image embeddings.

The classifier follows CLIP (Radford et al. 2021, Sec. 3.1.4): every class name is put into every
template, each prompt is encoded and L2-normalised, the prompts of a class are averaged and the mean
is normalised again. Images are classified by cosine similarity (scaled by 100, as CLIP_benchmark
does, which leaves the ranking unchanged). Metrics and names follow CLIP_benchmark: ``acc1``,
``acc5`` (only with >= 5 classes) and ``mean_per_class_recall`` (sklearn's balanced accuracy:
the mean recall over the classes present in the labels).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipkit.eval.gather import gather_rows, is_prepared_loader
from clipkit.eval.prompts import build_prompts, check_template


def _device_of(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def build_zeroshot_classifier(
    model: Any,
    classnames: list[str],
    templates: list[str],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Zero-shot classifier weights from class names x templates.

    Args:
        model: a :class:`~clipkit.models.DualEncoder` (``tokenize`` + ``encode_text``).
        classnames: ``C`` class names, in label order.
        templates: ``T`` templates with ``{}`` (or ``{c}``) where the class name goes.
        batch_size: prompts encoded per forward pass (prompts of several classes share one).
        device: where to run; defaults to the model's device.
        progress: show a progress bar over prompt batches.

    Returns:
        ``(D, C)`` float32 tensor; column ``c`` is the unit-norm mean of class ``c``'s prompts.

    Raises:
        ValueError: no class names, no templates, or a template without ``{}``.
    """
    if not classnames:
        raise ValueError("zero-shot classifier: no class names given")
    if not templates:
        raise ValueError("zero-shot classifier: no templates given")
    templates = [check_template(t) for t in templates]
    dev = _device_of(model, device)
    prompts = build_prompts(classnames, templates)  # C*T prompts, class-major
    was_training = model.training
    model.eval()
    chunks = []
    starts = range(0, len(prompts), batch_size)
    for s in tqdm(starts, desc="classifier", disable=not progress, leave=False):
        tokens = model.tokenize(prompts[s : s + batch_size]).to(dev)  # (b, L)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))  # (b, D)
    model.train(was_training)
    emb = torch.cat(chunks).view(len(classnames), len(templates), -1)  # (C, T, D)
    weights = F.normalize(emb.mean(dim=1), dim=-1)  # (C, D)
    return weights.t().contiguous()  # (D, C)


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, labels, skipped) from a tuple/list batch or a ``{"image","cls"}`` dict."""
    if isinstance(batch, dict):
        return batch["image"], torch.as_tensor(batch["cls"]), int(batch.get("skipped", 0))
    images, labels = batch[0], batch[1]
    return images, torch.as_tensor(labels), 0


@dataclass
class Predictions:
    """Gathered per-sample outputs of a zero-shot run (on every rank)."""

    topk: np.ndarray  # (N, k) predicted class ids, best first; k = min(5, C)
    labels: np.ndarray  # (N,) true class ids
    num_classes: int
    skipped: int = 0  # unreadable images and incomplete samples
    skipped_shards: int = 0  # shards cut short by truncation or corruption


@torch.no_grad()
def predict(
    model: Any,
    batches: Iterable[Any],
    classifier: torch.Tensor,
    *,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Predictions:
    """Run the image tower over ``batches`` and keep the top-k classes per image.

    Args:
        model: a DualEncoder (``encode_image``).
        batches: iterable of ``(images (B,3,H,W), labels (B,))`` or dicts ``{"image", "cls"}``
            (an optional ``"skipped"`` int counts unreadable images dropped from the batch, an
            optional ``"skipped_shards"`` int the damaged shards it reports).
        classifier: ``(D, C)`` from :func:`build_zeroshot_classifier`.
        accelerator: an ``accelerate.Accelerator``; each rank embeds its own batches (a
            disjoint slice, any length) and the predictions are gathered at the end; a loader
            prepared by Accelerate is gathered per batch with ``gather_for_metrics``, which drops
            the duplicates padding its last batch.
        device: where to run; defaults to the model's device.
        progress: show a progress bar.

    Returns:
        :class:`Predictions` holding all ranks' samples.

    Raises:
        ValueError: a label outside ``[0, C)`` or no samples at all.
    """
    dev = _device_of(model, device)
    num_classes = classifier.shape[1]
    k = min(5, num_classes)
    classifier = classifier.to(dev, torch.float32)
    was_training = model.training
    model.eval()
    # Loaders prepared by Accelerate pad the last batch with duplicates: gather per batch so
    # gather_for_metrics drops them. Otherwise ranks hold disjoint slices of any length:
    # gather once at the end (a per-batch collective would hang on unequal batch counts).
    per_batch = accelerator is not None and is_prepared_loader(batches)
    tops, labels_all, skipped, skipped_shards = [], [], 0, 0
    for batch in tqdm(batches, desc="zero-shot", disable=not progress, unit="batch"):
        images, labels, n_skip = _unpack(batch)
        skipped += n_skip
        skipped_shards += int(batch.get("skipped_shards", 0)) if isinstance(batch, dict) else 0
        if images.shape[0] == 0:
            continue
        feats = F.normalize(model.encode_image(images.to(dev)).float(), dim=-1)  # (B, D)
        logits = 100.0 * feats @ classifier  # (B, C)
        top = logits.topk(k, dim=1).indices  # (B, k)
        labels = labels.to(dev).long()  # (B,)
        if per_batch:
            top, labels = accelerator.gather_for_metrics((top, labels))
        tops.append(top)
        labels_all.append(labels)
    model.train(was_training)
    top_t = torch.cat(tops) if tops else torch.zeros(0, k, dtype=torch.long, device=dev)
    lab_t = torch.cat(labels_all) if labels_all else torch.zeros(0, dtype=torch.long, device=dev)
    if accelerator is not None and not per_batch:
        (top_t, lab_t), _ = gather_rows(accelerator, top_t, lab_t)
    if accelerator is not None:
        counts = torch.tensor([skipped, skipped_shards], device=dev)
        skipped, skipped_shards = accelerator.reduce(counts, "sum").tolist()
    if top_t.shape[0] == 0:
        raise ValueError("zero-shot evaluation: the data yielded no images")
    topk = top_t.cpu().numpy()
    labels_np = lab_t.cpu().numpy().astype(np.int64)
    bad = (labels_np < 0) | (labels_np >= num_classes)
    if bad.any():
        raise ValueError(
            f"zero-shot evaluation: label {int(labels_np[bad][0])} is outside the "
            f"{num_classes} class names (class count differs from the data)"
        )
    return Predictions(topk, labels_np, num_classes, int(skipped), int(skipped_shards))


def classification_metrics(topk: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """CLIP_benchmark's metrics from top-k predictions.

    Args:
        topk: ``(N, k)`` predicted ids, best first (``k >= 5`` needed for ``acc5``).
        labels: ``(N,)`` true ids.
        num_classes: ``C``; ``acc5`` is reported only when ``C >= 5``.

    Returns:
        ``{"acc1", ["acc5",] "mean_per_class_recall"}`` as floats.
    """
    correct = topk == labels[:, None]  # (N, k)
    out = {"acc1": float(correct[:, 0].mean())}
    if num_classes >= 5:
        out["acc5"] = float(correct[:, :5].any(axis=1).mean())
    out["mean_per_class_recall"] = float(per_class_recall(topk[:, 0], labels, num_classes)[1])
    return out


def per_class_recall(
    pred: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, float]:
    """Recall of each class and their mean over classes present in ``labels``.

    Returns:
        ``(recall (C,), mean)``; classes without samples get NaN and are left out of the mean,
        as in sklearn's ``balanced_accuracy_score``.
    """
    support = np.bincount(labels, minlength=num_classes)  # (C,)
    hits = np.bincount(labels[pred == labels], minlength=num_classes)  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / np.maximum(support, 1), np.nan)
    return recall, float(np.nanmean(recall))


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts; row = true class, column = predicted class (scikit-learn's)."""
    from sklearn.metrics import confusion_matrix as sk_confusion

    return sk_confusion(labels, pred, labels=np.arange(num_classes))


def zero_shot(
    model: Any,
    batches: Iterable[Any],
    classnames: list[str],
    templates: list[str],
    *,
    accelerator: Any = None,
    device: torch.device | str | None = None,
    per_class: bool = False,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot classification accuracy of ``model`` on labelled ``batches``.

    Args:
        model: a DualEncoder.
        batches: iterable of ``(images (B,3,H,W) normalised, labels (B,))`` or dicts
            ``{"image", "cls"[, "skipped"]}``; with an accelerator, this rank's share.
        classnames: ``C`` names in label order.
        templates: prompt templates with ``{}``.
        accelerator: optional ``accelerate.Accelerator``; every rank embeds its slice and the
            predictions are gathered, so every rank returns the same metrics.
        device: where to run; defaults to the model's device.
        per_class: add ``recall/<classname>`` for every class.
        batch_size: prompts per text forward pass.
        progress: show progress bars.

    Returns:
        ``{"acc1", "acc5" (if C >= 5), "mean_per_class_recall", "n"}``, plus ``"skipped"`` when
        the batches report unreadable images, ``"skipped_shards"`` when they report truncated or
        unreadable shards, plus per-class recalls when asked.

    Raises:
        ValueError: bad templates, labels outside the class names, or no images.

    Example:
        >>> m = zero_shot(model, loader, load_classnames("cifar10"), load_templates("cifar10"))
        >>> sorted(m)
        ['acc1', 'acc5', 'mean_per_class_recall', 'n']
    """
    classifier = build_zeroshot_classifier(
        model, classnames, templates, batch_size=batch_size, device=device, progress=progress
    )
    preds = predict(
        model, batches, classifier, accelerator=accelerator, device=device, progress=progress
    )
    out: dict[str, float] = classification_metrics(preds.topk, preds.labels, len(classnames))
    out["n"] = float(len(preds.labels))
    if preds.skipped:
        out["skipped"] = float(preds.skipped)
    if preds.skipped_shards:
        out["skipped_shards"] = float(preds.skipped_shards)
    if per_class:
        recall, _ = per_class_recall(preds.topk[:, 0], preds.labels, len(classnames))
        for name, r in zip(classnames, recall):
            out[f"recall/{name}"] = float(r)
    return out
