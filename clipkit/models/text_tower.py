"""The text tower of an open_clip model, run at each batch's real length (exact).

open_clip's tokenizers pad every caption to the context length (77), and most captions are far
shorter; the text tower's cost grows with the length (attention quadratically). A batch of token
ids ``(B, 77)`` is cut to its longest real sequence (the last non-pad position + 1, rounded up
to ``multiple`` for kernels that like aligned shapes) before the tower. That is exact, not an
approximation, wherever no kept position can see a cut one:

- open_clip's causal text transformer: position ``i`` attends to ``0..i`` only, positional
  embeddings are absolute, and the pooled token (the end-of-text token for ``argmax`` / ``eos``
  pooling, the first for ``first``) lies inside the kept part. open_clip's own forward takes the
  full 77x77 mask and positional table, so the cut forward slices them (:meth:`TextTower.forward`).
- HF ``transformers`` towers: padding is masked out of attention (``attention_mask``) and out of
  the pooler, with absolute positions from 0; cutting trailing padding changes no kept value.

Where it is not exact (no causal mask and no padding mask, a class token appended at the end as
in CoCa, ``last`` pooling), the tower runs at the full length. Results equal the full-length
forward up to floating-point summation order (tests/models/test_text_length.py: within 1e-6).

A *frozen* tower (LiT: every parameter of its trunk locked) is split into a trunk run without
autograd, in eval mode (dropout off), whose outputs
:class:`~clipkit.models.feature_cache.FeatureCache` may keep, and a trainable head (the HF
tower's projection; nothing for a fully locked open_clip tower).
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import text_global_pool
from torch import nn

# Pooling types that read a position inside the real sequence (never the last padded slot).
_EXACT_POOLS = ("argmax", "eos", "first")


def real_lengths(text: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``(B,)`` index of each row's last non-pad token + 1 (0 for an all-pad row)."""
    pos = torch.arange(1, text.shape[1] + 1, device=text.device)  # (L,)
    return ((text != pad_id) * pos).amax(dim=1)  # (B,)


def cut_length(text: torch.Tensor, pad_id: int, multiple: int) -> int:
    """The batch's longest real sequence, rounded up to ``multiple`` and capped at ``L``."""
    n = int(real_lengths(text, pad_id).max()) if text.numel() else 0
    m = max(1, multiple)
    return min(text.shape[1], max(m, -(-n // m) * m))


class TextTower:
    """A view of ``clip``'s text tower: exact cut-length forward, frozen trunk and head.

    Args:
        clip: an open_clip ``CLIP`` (text parts as attributes) or ``CustomTextCLIP`` (``.text``
            an open_clip ``TextTransformer`` or an HF ``HFTextEncoder``).
        dynamic: cut each batch to its real length where that is exact.
        multiple: round the cut length up to a multiple of this.
    """

    def __init__(self, clip: nn.Module, dynamic: bool = True, multiple: int = 8) -> None:
        self.clip = clip
        self.multiple = multiple
        text = getattr(clip, "text", None)
        self.hf = isinstance(text, HFTextEncoder)
        # open_clip's text parts live on ``clip`` itself (CLIP) or on ``clip.text``.
        self.src: Any = text if text is not None else clip
        if self.hf:
            self.pad_id = int(text.config.pad_token_id)
            exact = True
        else:
            s = self.src
            self.pool = getattr(s, "pool_type", None) or getattr(s, "text_pool_type", "argmax")
            self.eos_id = getattr(s, "eos_id", None) or getattr(s, "text_eos_id", None)
            self.pad_id = int(getattr(s, "pad_id", 0))
            exact = (
                getattr(s, "cls_emb", None) is None
                and s.attn_mask is not None  # causal: no kept position sees a later one
                and self.pool in _EXACT_POOLS
                # argmax pooling reads the largest id: padding must not be able to win it
                and (self.pool != "argmax" or self.pad_id == 0)
            )
        self.dynamic = dynamic and exact

    # -- shapes -----------------------------------------------------------------------------
    def cut(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` -> ``(B, L')``: the batch's real length where that is exact."""
        if not self.dynamic:
            return text
        return text[:, : cut_length(text, self.pad_id, self.multiple)]

    # -- forward ----------------------------------------------------------------------------
    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` -> unnormalised features ``(B, D)``, at the cut length: the
        trunk then the head (HF: the encoder's own forward, split at its projection)."""
        return self.head(self.trunk(text))

    def _trunk_oc(self, text: torch.Tensor) -> torch.Tensor:
        """open_clip's text transformer on ``(B, L')`` ids with the mask and positions cut."""
        s = self.src
        n = text.shape[1]
        cast = s.transformer.get_cast_dtype()
        x = s.token_embedding(text).to(cast)  # (B, L', W)
        x = x + s.positional_embedding[:n].to(cast)
        x = s.transformer(x, attn_mask=s.attn_mask[:n, :n])  # causal (L', L')
        x = s.ln_final(x)
        return text_global_pool(x, text, self.pool, eos_token_id=self.eos_id)  # (B, W)

    def _head_oc(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.src.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (B, D)

    # -- frozen trunk -----------------------------------------------------------------------
    def trunk_modules(self) -> list[nn.Module]:
        """The modules a LiT lock freezes (the HF transformer; open_clip's whole text tower)."""
        if self.hf:
            return [self.clip.text.transformer]
        s = self.src
        return [s.token_embedding, s.transformer, s.ln_final]

    def _trunk_params(self) -> list[torch.Tensor]:
        ps = [p for m in self.trunk_modules() for p in m.parameters()]
        if not self.hf:
            ps.append(self.src.positional_embedding)
            if isinstance(self.src.text_projection, nn.Parameter):
                ps.append(self.src.text_projection)
            elif isinstance(self.src.text_projection, nn.Module):
                ps.extend(self.src.text_projection.parameters())
        return ps

    def frozen(self) -> bool:
        """Whether no parameter of the trunk (open_clip: of the whole tower) is trained."""
        return not any(p.requires_grad for p in self._trunk_params())

    def trunk(self, text: torch.Tensor) -> torch.Tensor:
        """The frozen part: ``(B, L)`` ids -> ``(B, F)`` features (HF: pooled, before ``proj``;
        open_clip: the tower's output). Run without autograd by the caller."""
        text = self.cut(text)
        if self.hf:
            t = self.clip.text
            mask = (text != self.pad_id).long()  # (B, L')
            out = t.transformer(input_ids=text, attention_mask=mask)
            return t.pooler(out, mask)  # (B, F)
        if text.shape[1] == self.src.positional_embedding.shape[0] or not self.dynamic:
            return self.clip.encode_text(text)
        return self._head_oc(self._trunk_oc(text))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The trainable part after a frozen trunk: the HF projection, or nothing."""
        return self.clip.text.proj(x) if self.hf else x
