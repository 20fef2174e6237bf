"""Chunked retrieval ranks against a full-matrix reference and CLIP_benchmark's recall_at_k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_fakes import KeyedTextModel

from clipkit.eval import retrieval
from clipkit.eval.retrieval import rank_metrics, retrieval_ranks


def _random_set(n_img: int, caps_per_img: list[int], dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)  # (N, D)
    t2i = torch.tensor([i for i, c in enumerate(caps_per_img) for _ in range(c)])  # (M,)
    # Captions near their image, so recalls are neither 0 nor 1.
    txt = F.normalize(img[t2i] + 0.9 * torch.randn(len(t2i), dim, generator=g), dim=-1)
    perm = torch.randperm(len(t2i), generator=g)  # captions need not be grouped by image
    return img, txt[perm], t2i[perm]


def _naive_ranks(img, txt, t2i):
    scores = txt @ img.t()  # (M, N)
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(t2i)), t2i] = True
    # rank = 1 + #candidates scoring above the (best) positive
    t_rank = (scores > scores[pos][:, None]).sum(1) + 1
    best = scores.t().masked_fill(~pos.t(), -torch.inf).amax(1)  # (N,)
    i_rank = (scores.t() > best[:, None]).sum(1) + 1
    return t_rank, i_rank


@pytest.mark.parametrize("chunk_elems", [1, 7, 100, 1 << 20])
def test_chunked_ranks_match_full_matrix(chunk_elems: int) -> None:
    caps = [5, 1, 3, 5, 2, 5, 4, 5, 5, 1, 2, 5]
    img, txt, t2i = _random_set(len(caps), caps)
    t_rank, i_rank = retrieval_ranks(img, txt, t2i, chunk_elems=chunk_elems)
    ref_t, ref_i = _naive_ranks(img, txt, t2i)
    assert torch.equal(t_rank, ref_t) and torch.equal(i_rank, ref_i)


def test_recalls_match_clip_benchmark_definition() -> None:
    zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    caps = [5] * 30 + [3] * 10
    img, txt, t2i = _random_set(len(caps), caps, seed=4)
    t_rank, i_rank = retrieval_ranks(img, txt, t2i, chunk_elems=97)
    out = rank_metrics(t_rank, i_rank, (1, 5, 10))
    scores = txt @ img.t()
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(t2i)), t2i] = True
    for k in (1, 5, 10):
        ref_t = (zsr.recall_at_k(scores, pos, k) > 0).float().mean().item()
        ref_i = (zsr.recall_at_k(scores.t(), pos.t(), k) > 0).float().mean().item()
        assert out[f"image_retrieval_recall@{k}"] == pytest.approx(ref_t, abs=1e-7)
        assert out[f"text_retrieval_recall@{k}"] == pytest.approx(ref_i, abs=1e-7)
    assert 0 < out["image_retrieval_recall@1"] < 1
    assert out["image_retrieval_mean_rank"] == pytest.approx(t_rank.double().mean().item())
    assert out["text_retrieval_median_rank"] == float(np.median(i_rank.numpy()))


def test_bad_inputs() -> None:
    img, txt, t2i = _random_set(3, [2, 2, 2])
    with pytest.raises(ValueError, match="one caption per image"):
        retrieval_ranks(torch.cat([img, img[:1]]), txt, t2i)  # image 3 has no caption
    with pytest.raises(ValueError, match="outside"):
        retrieval_ranks(img, txt, t2i + 1)
    with pytest.raises(ValueError, match="shape"):
        retrieval_ranks(img, txt, t2i[:-1])


def test_retrieval_on_batches_with_known_answer() -> None:
    # Each "image" is the embedding of its first caption, so text->image is perfect for those.
    model = KeyedTextModel()
    caps = [[f"caption {i} a", f"caption {i} b"] for i in range(9)]
    images = torch.stack([model.text_vector(c[0]) for c in caps])  # (9, D)
    batches = [(images[i : i + 4], caps[i : i + 4]) for i in range(0, 9, 4)]
    out = retrieval(model, batches, recall_k=(1, 9))
    assert out["text_retrieval_recall@1"] == 1.0  # every image finds its own first caption
    assert out["image_retrieval_recall@9"] == 1.0  # all 9 images are in the top 9
    assert out["image_retrieval_recall@1"] >= 0.5  # the "a" captions are exact
    assert out["n_images"] == 9 and out["n_captions"] == 18
