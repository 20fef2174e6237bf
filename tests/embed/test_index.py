"""Index: exact search equals numpy, ANN recall, stable ids, incremental add, model check."""

from __future__ import annotations

import numpy as np
import pytest

from clipkit.embed.index import Index, choose_kind, exact_search, recall_at_k


def unit(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_equals_numpy_bruteforce() -> None:
    x, q = unit(3000, seed=1), unit(40, seed=2)
    ids = np.arange(3000, dtype=np.int64) * 7 + 100  # arbitrary external ids
    idx = Index.build(x, ids, kind="flat")
    s, found = idx.search(q, k=10)
    sims = q @ x.T  # (Q, N)
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, ids[ref])
    np.testing.assert_allclose(s, np.take_along_axis(sims, ref, 1), atol=1e-5)
    es, ei = exact_search(x, q, 10, chunk=700)  # chunking must not change the answer
    np.testing.assert_array_equal(ei, ref)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_ann_recall_and_audit(kind: str) -> None:
    x = unit(4000, seed=3)
    idx = Index.build(x, np.arange(4000), kind=kind)
    assert idx.kind == kind and len(idx) == 4000
    rep = idx.audit(x, np.arange(4000), n_queries=100, k=10)
    floor = 0.9 if kind == "hnsw" else 0.3  # PQ codes on random data lose most of the ranking
    assert rep["recall@10"] >= floor, rep
    if kind == "hnsw":
        idx.set_search_params(ef_search=400)
        assert idx.audit(x, np.arange(4000), n_queries=100)["recall@10"] >= rep["recall@10"]


def test_incremental_add_stable_ids_and_roundtrip(tmp_path) -> None:
    x = unit(600, seed=4)
    idx = Index.build(x[:400], np.arange(400) + 1000, kind="hnsw", model={"model_id": "m1"})
    idx.add(x[400:], np.arange(400, 600) + 1000, model_id="m1")
    idx.save(tmp_path / "ix")
    back = Index.load(tmp_path / "ix")
    assert back.kind == "hnsw" and back.model["model_id"] == "m1" and len(back) == 600
    _, found = back.search(x[[5, 450]], k=1)
    np.testing.assert_array_equal(found[:, 0], [1005, 1450])
    np.testing.assert_array_equal(np.sort(back.ids()), np.arange(600) + 1000)
    with pytest.raises(ValueError, match="already in the index"):
        back.add(x[:2], [1000, 5000])
    with pytest.raises(ValueError, match="another model|model m2"):
        back.search(x[:1], k=3, model_id="m2")
    with pytest.raises(ValueError, match="model m2"):
        back.add(x[:1], [9999], model_id="m2")
    with pytest.raises(ValueError, match="dimension 16"):
        back.search(np.ones((1, 16), np.float32), k=3)
    with pytest.raises(ValueError, match="k must be"):
        back.search(x[:1], k=0)
    with pytest.raises(ValueError, match="not a clipkit index"):
        Index.load(tmp_path)


def test_more_k_than_vectors_pads_with_minus_one() -> None:
    idx = Index.build(unit(3), kind="flat")
    _, ids = idx.search(unit(1, seed=9), k=5)
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2] and ids[0, 3:].tolist() == [-1, -1]


def test_choose_kind_by_size_and_budget() -> None:
    gb = 2**30
    assert choose_kind(10_000, 512, gb) == "flat"
    assert choose_kind(1_000_000, 512, 8 * gb) == "hnsw"
    assert choose_kind(1_000_000, 512, gb) == "ivfpq"
    assert recall_at_k(np.array([[1, 2]]), np.array([[2, 3]])) == 0.5


def test_hnsw_storage_float16_default_half_size_same_neighbours(tmp_path) -> None:
    x, q = unit(2000, d=64, seed=5), unit(30, d=64, seed=6)
    half = Index.build(x, kind="hnsw")
    full = Index.build(x, kind="hnsw", hnsw_storage="float32")
    assert half.info["hnsw_storage"] == "float16" and full.info["hnsw_storage"] == "float32"
    for idx in (half, full):
        idx.set_search_params(ef_search=2000)  # exhaustive: compares storage, not the graph
    hs, hi = half.search(q, 10)
    fs, fi = full.search(q, 10)
    assert recall_at_k(hi, fi) >= 0.99
    np.testing.assert_allclose(hs, fs, atol=2e-3)  # float16 vectors: ~1e-3 score error
    half.save(tmp_path / "h")
    full.save(tmp_path / "f")
    h_bytes = (tmp_path / "h" / "index.faiss").stat().st_size
    f_bytes = (tmp_path / "f" / "index.faiss").stat().st_size
    saved = 2000 * 64 * 2  # 2 of the 4 bytes of every stored component; the graph is the same
    assert abs((f_bytes - h_bytes) - saved) < 0.01 * saved, (f_bytes, h_bytes)
    back = Index.load(tmp_path / "h")
    np.testing.assert_array_equal(back.search(q, 10)[1], hi)
    with pytest.raises(ValueError, match="unknown HNSW storage 'int4'"):
        Index.build(x, kind="hnsw", hnsw_storage="int4")
