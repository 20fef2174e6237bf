"""The tiled kernels never materialise an N x M tensor (checked on every aten op's output)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipkit.losses import info_nce, siglip_loss


@pytest.mark.parametrize("loss", ["infonce", "infonce_hn", "siglip"])
def test_peak_tensor_is_a_tile_not_the_matrix(loss, largest_output):
    n, d, chunk = 1000, 8, 64
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    hn = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    s = torch.tensor(14.3, requires_grad=True)
    with largest_output() as mode:
        if loss == "siglip":
            out = siglip_loss(q, k, s, torch.tensor(-10.0), chunk_size=chunk)
        else:
            out = info_nce(q, k, s, hard_negatives=hn if loss == "infonce_hn" else None,
                           chunk_size=chunk)  # fmt: skip
        out.backward()
    keys = 2 * n if loss == "infonce_hn" else n
    # Largest tensors: the (M, D) key set and one chunk x chunk tile; N x M would be 1e6+.
    assert mode.largest <= max(keys * d, chunk * chunk)
    assert q.grad is not None and k.grad is not None and s.grad is not None
