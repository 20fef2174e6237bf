"""The SimCSE loss is sentence-transformers' MultipleNegativesRankingLoss (scale 20)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipkit.config import load_config
from clipkit.losses import build_loss, info_nce

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")


def _emb(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("n,d", [(8, 16), (33, 384)])
@pytest.mark.parametrize("h", [0, 1, 2])
def test_equals_multiple_negatives_ranking_loss(n, d, h):
    q, k = _emb(n, d, 0), _emb(n, d, 1)
    negs = [_emb(n, d, 2 + j) for j in range(h)]
    # MNRL's columns: anchors, positives, then one column per negative (each (n, D)).
    mnrl = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0)
    ref = mnrl.compute_loss_from_embeddings([q, k, *negs], labels=None)
    hard = torch.cat(negs) if negs else None  # (h*n, D), column-major like SentenceBatches
    ours = info_nce(q, k, 20.0, hard_negatives=hard, symmetric=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # The module built from the shipped config (fixed T = 0.05, one direction) agrees too.
    cfg = load_config("configs/simcse_sup.yaml")
    module = build_loss(cfg.loss).double()
    assert not any(p.requires_grad for p in module.parameters())
    torch.testing.assert_close(module(q, k, hard_negatives=hard), ref, rtol=0, atol=1e-6)


def test_gradients_match_mnrl():
    # MNRL normalises inside cos_sim, info_nce takes normalised inputs: compare the gradients
    # with respect to the same raw (unnormalised) encoder outputs.
    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(12, 24, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    mnrl = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0)
    g_ref = torch.autograd.grad(mnrl.compute_loss_from_embeddings(raw, None), raw)
    q, k, hn = (F.normalize(x, dim=-1) for x in raw)
    g_ours = torch.autograd.grad(info_nce(q, k, 20.0, hard_negatives=hn, symmetric=False), raw)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
