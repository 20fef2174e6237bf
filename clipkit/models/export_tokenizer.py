"""open_clip's CLIP tokenizer as Hugging Face tokenizer files (for the hf and onnx exports).

open_clip's ``SimpleTokenizer`` is CLIP's byte-level BPE: 256 byte symbols, the same with the
end-of-word marker ``</w>``, 48,894 merges from the bundled ``bpe_simple_vocab_16e6.txt.gz``, then
the start and end tokens (ids 49406 and 49407; 49,408 in all). Written as ``vocab.json`` +
``merges.txt`` (the files ``transformers``' CLIP tokenizer reads, in every version) and
``tokenizer.json`` (the ``tokenizers`` library's single file, which the ONNX runtime side reads
without torch). Ids are open_clip's; open_clip names the specials ``<start_of_text>`` /
``<end_of_text>``, Hugging Face ``<|startoftext|>`` / ``<|endoftext|>``.

What the files cannot say (checked in tests/models/test_export_hf.py): open_clip cleans text
first (``ftfy.fix_text``: curly quotes straightened, mojibake fixed; HTML entities such as
``&amp;`` decoded), which ``CLIPTokenizer`` does not; and open_clip pads with id 0 where
``CLIPTokenizer`` pads with the end token, which changes no text feature (causal mask, pooled
at the first end token). The ONNX reader applies open_clip's cleaning before the BPE.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48,894


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab token -> id, merges)`` of open_clip's bundled CLIP BPE, in open_clip's id order."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 1 + N_MERGES]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    assert len(tokens) == VOCAB_SIZE
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def uses_clip_bpe(model: Any) -> str:
    """Why ``model``'s tokenizer is not open_clip's plain CLIP BPE, or ``""`` when it is.

    Args:
        model: a :class:`~clipkit.models.DualEncoder`.
    """
    from open_clip.tokenizer import SimpleTokenizer

    tok = model.tokenizer
    text_cfg = model.model_cfg.get("text_cfg", {})
    if not isinstance(tok, SimpleTokenizer):
        return f"its tokenizer is {type(tok).__name__}, not CLIP's BPE (open_clip SimpleTokenizer)"
    if text_cfg.get("tokenizer_kwargs") or text_cfg.get("tokenizer_mode"):
        return "its tokenizer has tokenizer_kwargs/tokenizer_mode that CLIP's BPE files cannot hold"
    if tok.vocab_size != VOCAB_SIZE or text_cfg.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        return f"its vocabulary has {tok.vocab_size} tokens, not CLIP's {VOCAB_SIZE}"
    return ""


def write_clip_tokenizer(out: Path, context_length: int) -> None:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer.json`` and ``tokenizer_config.json``.

    ``transformers.CLIPTokenizer.from_pretrained(out)`` then gives open_clip's ids for the same
    text (up to the differences in the module docstring), truncating and padding to
    ``context_length`` (``model_max_length``).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=context_length)
    tok.save_pretrained(str(out))  # tokenizer.json + tokenizer_config.json
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    # transformers' file reader skips the first line of merges.txt (a version header).
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def is_clip_vocab(folder: Path) -> bool:
    """Whether ``folder``'s tokenizer (``vocab.json``, else ``tokenizer.json``) is CLIP's BPE
    vocabulary with open_clip's ids."""
    try:
        if (folder / "vocab.json").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        elif (folder / "tokenizer.json").is_file():
            tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = tok["model"]["vocab"]
        else:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return vocab == clip_bpe()[0]
