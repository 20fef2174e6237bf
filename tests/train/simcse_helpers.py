"""Helpers for the SimCSE tests: a tiny random BERT folder with the packaged MiniLM's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_bert(path: Path, dropout: float = 0.1, seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide random BERT + MiniLM's tokenizer to ``path``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from clipkit.models.sentence_encoder import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(""))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def write_sts(path: Path, rows: list[tuple[float, str, str]]) -> Path:
    """Write an STS-B style file (tab-separated, score in column 5)."""
    lines = [f"g\tf\t2012\t{i:04d}\t{s}\t{a}\t{b}" for i, (s, a, b) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
