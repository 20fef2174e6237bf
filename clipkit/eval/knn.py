"""Weighted k-nearest-neighbour classification of features (InstDisc, Wu et al. 2018, Sec. 3.4).

The rule: with L2-normalised features, a test image's similarity to training image ``j`` is the
cosine ``s_j``; its ``k`` most similar training images each vote for their class with weight
``exp(s_j / T)``; classes are ranked by their summed votes. Exact ties are broken towards the
lower index, both among neighbours (which training rows are the ``k`` nearest) and among classes,
so the predictions are a function of the features alone, whatever the device or chunking.

SSL papers report this as "kNN accuracy" with ``k = 200``, ``T = 0.07`` (InstDisc; MoCo's and
lightly's CIFAR-10 monitors use the same rule).
"""

from __future__ import annotations

import torch

# Similarities held per chunk (2^28: 1 GiB in float32): ImageNet's 1.28M training rows get
# chunks of 209 test rows, CIFAR's 50,000 the full 1,024.
SIM_BUDGET = 1 << 28


def _check(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int,
) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes})")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 (got {chunk})")
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(
            f"features must be (N, D) and (M, D) (got {tuple(train_feats.shape)} and "
            f"{tuple(test_feats.shape)})"
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"train and test features differ in dimension ({train_feats.shape[1]} vs "
            f"{test_feats.shape[1]})"
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(
            f"train_labels must be ({train_feats.shape[0]},) (got {tuple(train_labels.shape)})"
        )
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    if train_labels.numel() and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes})")


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int,
    chunk: int | None = None,
    top: int = 5,
) -> torch.Tensor:
    """Rank the classes of each test row by InstDisc's weighted kNN vote.

    Args:
        train_feats: ``(N, D)`` L2-normalised training features.
        train_labels: ``(N,)`` class ids in ``[0, num_classes)``.
        test_feats: ``(M, D)`` L2-normalised test features (same device as the training ones).
        k: neighbours that vote (``min(k, N)`` when fewer training rows exist).
        temperature: ``T`` in the vote weight ``exp(cos / T)``.
        num_classes: ``C``.
        chunk: test rows per step; memory is ``O(chunk * N)`` whatever ``M`` is. Default: up to
            1,024 rows, fewer when that would exceed :data:`SIM_BUDGET` similarities.
        top: how many ranked classes to return per row.

    Returns:
        ``(M, min(top, C))`` int64 class ids, best first (on the features' device). Float16 /
        bfloat16 inputs are scored in float32; float64 inputs stay float64.

    Raises:
        ValueError: bad ``k``, ``temperature``, ``num_classes``, ``chunk``, shapes or labels.

    Example:
        >>> ranked = knn_classify(train.feats, train.labels, test.feats, num_classes=10)
        >>> acc1 = (ranked[:, 0] == test.labels).float().mean()
    """
    if chunk is None:
        chunk = max(1, min(1024, SIM_BUDGET // max(train_feats.shape[0], 1)))
    _check(train_feats, train_labels, test_feats, k, temperature, num_classes, chunk)
    dtype = torch.promote_types(train_feats.dtype, torch.float32)
    train = train_feats.to(dtype)
    labels = train_labels.to(train.device, torch.long)
    k = min(k, train.shape[0])
    n_top = min(top, num_classes)
    out = []
    for s in range(0, test_feats.shape[0], chunk):
        q = test_feats[s : s + chunk].to(train.device, dtype)  # (m, D)
        sim = q @ train.t()  # (m, N)
        vals, idx = sim.topk(k, dim=1)  # (m, k)
        # topk picks arbitrarily among rows tied with the k-th similarity; where such a tie
        # straddles the cut (duplicate images do this), take the lower indices, as a stable sort
        # would. Rare, so only those rows pay for a full sort.
        kth = vals[:, -1:]  # (m, 1)
        straddles = (sim == kth).sum(1) > (vals == kth).sum(1)  # (m,)
        if straddles.any():
            rows = straddles.nonzero().squeeze(1)
            order = torch.sort(sim[rows], dim=1, descending=True, stable=True).indices[:, :k]
            idx[rows] = order
            vals[rows] = sim[rows].gather(1, order)
        weights = (vals / temperature).exp()  # (m, k)
        votes = torch.zeros(q.shape[0], num_classes, dtype=dtype, device=train.device)
        votes.scatter_add_(1, labels[idx], weights)  # (m, C)
        # Stable descending sort: equal votes (classes nobody voted for, too) rank by class id.
        out.append(torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :n_top])
    if not out:
        return torch.zeros(0, n_top, dtype=torch.long, device=train.device)
    return torch.cat(out)


__all__ = ["SIM_BUDGET", "knn_classify"]
