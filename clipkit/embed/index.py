"""Index: a faiss vector index with stable external ids and a record of the model behind it.

Inner product on L2-normalised vectors (= cosine). The kind is chosen by size and a memory budget:
exact ``flat`` for small sets, ``hnsw`` when the full vectors plus the graph fit the budget, else
``ivfpq`` (compressed codes). Saved as a folder: ``index.faiss`` + ``index.json``.

Example:
    >>> idx = Index.build(vectors, ids, model={"model_id": emb.model_id})  # vectors (N, D)
    >>> scores, ids = idx.search(query, k=10, model_id=emb.model_id)      # (Q, 10) each
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.train.outputs import write_failed, write_file, write_text

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
KINDS = ("auto", "flat", "hnsw", "ivfpq")
# IVF-PQ trains 2^8 centroids per sub-vector by k-means, which needs at least that many points.
IVFPQ_MIN_VECTORS = 256
# Below this many vectors exact search is fast enough (about 1 ms per 100k x 512 dot products).
FLAT_MAX = 100_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
# HNSW keeps its vectors as float16 by default: ``clipkit embed`` stores float16 anyway, memory
# halves, and single queries ran 1.8-1.9x faster than float32 at equal recall (bench/README.md).
HNSW_STORAGE = ("float16", "float32")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("clipkit index needs faiss: pip install 'clipkit[index]'") from err
    return faiss


def hnsw_bytes(n: int, dim: int, m: int = HNSW_M, storage: str = "float16") -> int:
    """Approximate memory of an HNSW index: stored vectors plus ~2*M links per vector."""
    width = 2 if storage == "float16" else 4
    return n * (dim * width + 2 * m * 4 + 16) + n * 8  # + id map


def choose_kind(n: int, dim: int, memory_budget_bytes: int) -> str:
    """Pick ``flat`` / ``hnsw`` / ``ivfpq`` for ``n`` vectors of ``dim`` under a memory budget.

    Below :data:`IVFPQ_MIN_VECTORS` ``ivfpq`` cannot be trained, and such a set fits any budget
    as ``hnsw`` (a few hundred vectors), so it is never chosen there.
    """
    if n <= FLAT_MAX and n * dim * 4 <= memory_budget_bytes:
        return "flat"
    if hnsw_bytes(n, dim) <= memory_budget_bytes or n < IVFPQ_MIN_VECTORS:
        return "hnsw"
    return "ivfpq"


def check_ivfpq_size(n: int) -> None:
    """Refuse ``ivfpq`` on too few vectors in one line, before any training.

    Raises:
        ValueError: ``n`` < :data:`IVFPQ_MIN_VECTORS`.
    """
    if n < IVFPQ_MIN_VECTORS:
        raise ValueError(
            f"index kind ivfpq needs at least {IVFPQ_MIN_VECTORS} vectors to train its product "
            f"quantizer ({IVFPQ_MIN_VECTORS} codes per sub-vector), got {n}; use --kind flat "
            "(exact) or hnsw"
        )


def _as_matrix(x: Any, dim: int | None, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a (N, D) array, got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{what}: dimension {a.shape[1]} does not match the index dimension {dim}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return np.ascontiguousarray(a)


class Index:
    """A faiss index over unit vectors with int64 external ids and model provenance.

    Attributes:
        kind: ``flat``, ``hnsw`` or ``ivfpq``.
        dim: vector dimension D.
        model: dict recording the model that made the vectors (``model_id``, ``name``, ...).
        info: free-form build record (params, build seconds, added sources).
    """

    def __init__(self, faiss_index: Any, kind: str, dim: int, model: dict, info: dict) -> None:
        self.faiss_index = faiss_index
        self.kind = kind
        self.dim = dim
        self.model = dict(model)
        self.info = dict(info)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        dim: int,
        kind: str = "flat",
        model: dict | None = None,
        train_vectors: np.ndarray | None = None,
        n_expected: int = 0,
        hnsw_m: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
        hnsw_storage: str = "float16",
    ) -> Index:
        """An empty index of a concrete ``kind`` (``ivfpq`` needs ``train_vectors`` (T, D)).

        ``hnsw_storage`` is how HNSW keeps its vectors: ``float16`` (default; scores within
        ~1e-3 of float32) or ``float32``.

        Raises:
            ValueError: unknown kind or storage, or ivfpq without training vectors.
        """
        faiss = _faiss()
        ip = faiss.METRIC_INNER_PRODUCT
        info: dict[str, Any] = {}
        if kind == "flat":
            fi = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            if hnsw_storage == "float16":
                inner = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, hnsw_m, ip)
            elif hnsw_storage == "float32":
                inner = faiss.IndexHNSWFlat(dim, hnsw_m, ip)
            else:
                raise ValueError(
                    f"unknown HNSW storage '{hnsw_storage}'; valid: {', '.join(HNSW_STORAGE)}"
                )
            inner.hnsw.efConstruction = ef_construction
            inner.hnsw.efSearch = ef_search
            fi = faiss.IndexIDMap2(inner)
            info.update(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
            info["hnsw_storage"] = hnsw_storage
        elif kind == "ivfpq":
            if train_vectors is None or len(train_vectors) == 0:
                raise ValueError("index kind ivfpq needs training vectors")
            check_ivfpq_size(len(train_vectors))
            t = _as_matrix(train_vectors, dim, "training vectors")
            n = max(n_expected, len(t))
            nlist = int(max(1, min(4 * math.sqrt(n), len(t) // 39)))
            # Sub-vectors of >= 8 dims: 64 bytes per 512-d vector (32x smaller than float32).
            m = next((m for m in (64, 32, 16, 8, 4, 2) if dim % m == 0 and dim // m >= 8), 1)
            quantizer = faiss.IndexFlatIP(dim)
            fi = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, ip)
            fi.train(t)
            fi.nprobe = min(nlist, 32)
            info.update(nlist=nlist, pq_m=m, nprobe=fi.nprobe)
        else:
            raise ValueError(f"unknown index kind '{kind}'; valid: {', '.join(KINDS)}")
        info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return cls(fi, kind, dim, model or {}, info)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray | None = None,
        kind: str = "auto",
        model: dict | None = None,
        memory_budget_gb: float = 8.0,
        progress: bool = False,
        **kwargs: Any,
    ) -> Index:
        """Build an index over ``vectors`` (N, D) with external ``ids`` (N,) (default 0..N-1).

        Args:
            vectors: (N, D) float array, expected L2-normalised.
            ids: (N,) int64 external ids, unique.
            kind: ``auto`` picks by size and ``memory_budget_gb`` (see :func:`choose_kind`).
            model: provenance dict; ``model_id`` is checked on every later add/search.
            memory_budget_gb: memory the index may use.
            progress: show a progress bar while adding.
            **kwargs: passed to :meth:`create` (``hnsw_m``, ``ef_construction``, ``ef_search``).

        Returns:
            The built index.

        Raises:
            ValueError: bad shapes, NaN, duplicate ids, unknown kind.
        """
        x = _as_matrix(vectors, None, "vectors")
        if kind == "auto":
            kind = choose_kind(len(x), x.shape[1], int(memory_budget_gb * 2**30))
        elif kind not in KINDS:
            raise ValueError(f"unknown index kind '{kind}'; valid: {', '.join(KINDS)}")
        train = None
        if kind == "ivfpq":
            check_ivfpq_size(len(x))
            rng = np.random.default_rng(0)
            sel = rng.choice(len(x), size=min(len(x), 100_000), replace=False)
            train = x[np.sort(sel)]
        idx = cls.create(x.shape[1], kind, model, train_vectors=train, n_expected=len(x), **kwargs)
        t0 = time.perf_counter()
        idx.add(x, ids, model_id=(model or {}).get("model_id"), progress=progress)
        idx.info["build_seconds"] = round(time.perf_counter() - t0, 3)
        return idx

    # ------------------------------------------------------------------ use
    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    def _check_model(self, model_id: str | None, what: str) -> None:
        mine = self.model.get("model_id")
        if model_id is not None and mine is not None and model_id != mine:
            raise ValueError(
                f"{what} come from model {model_id}, but this index holds vectors of model {mine} "
                f"({self.model.get('name', '?')}); re-embed with that model or build a new index"
            )

    def ids(self) -> np.ndarray:
        """All external ids in insertion order, (N,) int64."""
        faiss = _faiss()
        if isinstance(self.faiss_index, faiss.IndexIDMap2 | faiss.IndexIDMap):
            return faiss.vector_to_array(self.faiss_index.id_map).astype(np.int64)
        inv = self.faiss_index.invlists
        out = [
            faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
            for i in range(inv.nlist)
            if inv.list_size(i)
        ]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def add(
        self,
        vectors: np.ndarray,
        ids: np.ndarray | None = None,
        model_id: str | None = None,
        progress: bool = False,
        chunk: int = 20_000,
    ) -> None:
        """Add ``vectors`` (N, D) under external ``ids`` (N,) int64 (default: next free ids).

        Raises:
            ValueError: wrong dimension, NaN, an id already in the index or repeated, or vectors
                from another model than the index's.
        """
        self._check_model(model_id, "vectors")
        x = _as_matrix(vectors, self.dim, "vectors")
        existing = self.ids()
        if ids is None:
            start = int(existing.max()) + 1 if len(existing) else 0
            ids = np.arange(start, start + len(x), dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(x):
            raise ValueError(f"ids: {len(ids)} ids for {len(x)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids: repeated ids in one add")
        dup = np.intersect1d(existing, ids)
        if len(dup):
            raise ValueError(f"ids: {len(dup)} ids already in the index (e.g. {int(dup[0])})")
        from tqdm import tqdm

        bar = tqdm(total=len(x), desc=f"index {self.kind}", unit="vec", disable=not progress)
        for s in range(0, len(x), chunk):
            self.faiss_index.add_with_ids(x[s : s + chunk], ids[s : s + chunk])
            bar.update(min(chunk, len(x) - s))
        bar.close()

    def search(
        self, queries: np.ndarray, k: int = 10, model_id: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product for ``queries`` (Q, D) or (D,).

        Returns:
            ``(scores (Q, k) float32, ids (Q, k) int64)``, best first; id -1 pads when the
            index holds fewer than ``k`` vectors.

        Raises:
            ValueError: bad k, wrong dimension, NaN, or queries from another model.
        """
        self._check_model(model_id, "query vectors")
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = _as_matrix(queries, self.dim, "queries")
        scores, ids = self.faiss_index.search(q, int(k))
        return scores, ids.astype(np.int64)

    def set_search_params(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Trade speed for recall: HNSW ``efSearch`` / IVF ``nprobe``."""
        faiss = _faiss()
        if ef_search is not None and self.kind == "hnsw":
            faiss.downcast_index(self.faiss_index.index).hnsw.efSearch = int(ef_search)
            self.info["ef_search"] = int(ef_search)
        if nprobe is not None and self.kind == "ivfpq":
            self.faiss_index.nprobe = int(nprobe)
            self.info["nprobe"] = int(nprobe)

    def audit(
        self, vectors: np.ndarray, ids: np.ndarray, n_queries: int = 200, k: int = 10, seed: int = 0
    ) -> dict[str, float]:
        """Recall@k of this index against exact search over the same ``vectors`` (N, D).

        Queries are ``n_queries`` vectors sampled from ``vectors`` (the use case: "more like this").

        Returns:
            ``{"recall@k": r, "n_queries": q, "exact_ms": ..., "index_ms": ...}``.
        """
        x = _as_matrix(vectors, self.dim, "vectors")
        ids = np.asarray(ids, dtype=np.int64)
        rng = np.random.default_rng(seed)
        q = x[rng.choice(len(x), size=min(n_queries, len(x)), replace=False)]
        t0 = time.perf_counter()
        exact = exact_search(x, q, k)[1]
        t1 = time.perf_counter()
        found = self.search(q, k)[1]
        t2 = time.perf_counter()
        return {
            f"recall@{k}": recall_at_k(found, ids[exact]),
            "n_queries": len(q),
            "exact_ms": 1000 * (t1 - t0) / len(q),
            "index_ms": 1000 * (t2 - t1) / len(q),
        }

    # ------------------------------------------------------------------ persistence
    def save(self, out_dir: str | Path) -> Path:
        """Write ``index.faiss`` and ``index.json`` into ``out_dir`` (atomically replaced)."""
        faiss = _faiss()
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_failed("index", out, err) from None
        write_file(
            out / INDEX_FILE, lambda tmp: faiss.write_index(self.faiss_index, str(tmp)), "index"
        )
        meta = {"kind": self.kind, "dim": self.dim, "ntotal": len(self), "model": self.model}
        meta["info"] = self.info
        write_text(out / META_FILE, json.dumps(meta, indent=2), "index")
        return out

    @classmethod
    def load(cls, path: str | Path) -> Index:
        """Load an index folder written by :meth:`save`.

        Raises:
            ValueError: the folder lacks ``index.faiss`` / ``index.json``, or either is not what
                :meth:`save` writes (one line naming the file and what is wrong).
        """
        faiss = _faiss()
        p = Path(path).expanduser()
        if not (p / INDEX_FILE).is_file() or not (p / META_FILE).is_file():
            raise ValueError(f"not a clipkit index folder (needs {INDEX_FILE} + {META_FILE}): {p}")
        meta = _read_meta(p / META_FILE)
        try:
            fi = faiss.read_index(str(p / INDEX_FILE))
        except RuntimeError as err:  # faiss reports a corrupt or cut file as RuntimeError
            last = (str(err).strip().splitlines() or [""])[-1]
            raise ValueError(f"{p / INDEX_FILE}: not a readable faiss index ({last})") from None
        if fi.d != meta["dim"]:
            raise ValueError(
                f"{p / META_FILE}: says dim {meta['dim']}, but {INDEX_FILE} holds {fi.d}-d vectors"
            )
        idx = cls(fi, meta["kind"], meta["dim"], meta.get("model", {}), meta.get("info", {}))
        if idx.kind == "hnsw" and "ef_search" in idx.info:
            idx.set_search_params(ef_search=idx.info["ef_search"])
        return idx


def _read_meta(path: Path) -> dict[str, Any]:
    """``index.json``, checked to be what :meth:`Index.save` writes.

    Raises:
        ValueError: one line naming the file and the first key that is missing or wrong.
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: want a JSON object, found a JSON {type(meta).__name__}")
    for key in ("kind", "dim"):
        if key not in meta:
            raise ValueError(f"{path}: missing key '{key}'")
    if meta["kind"] not in KINDS[1:]:
        valid = ", ".join(KINDS[1:])
        raise ValueError(f"{path}: 'kind' is {meta['kind']!r}; valid: {valid}")
    if not isinstance(meta["dim"], int) or isinstance(meta["dim"], bool) or meta["dim"] < 1:
        raise ValueError(f"{path}: 'dim' must be a positive integer, got {meta['dim']!r}")
    for key in ("model", "info"):
        if not isinstance(meta.get(key, {}), dict):
            raise ValueError(f"{path}: '{key}' must be an object, got {meta[key]!r}"[:300])
    return meta


def exact_search(
    vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner product with numpy, chunked over ``vectors`` (N, D).

    Returns:
        ``(scores (Q, k), rows (Q, k))``, rows indexing ``vectors``; ties go to the lower row.
    """
    q = np.asarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s in range(0, len(vectors), chunk):
        sims = q @ np.asarray(vectors[s : s + chunk], dtype=np.float32).T  # (Q, c)
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]  # (Q, kk)
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], 1)
        cand_i = np.concatenate([best_i, part + s], 1)
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]  # score desc, then row asc
        best_s = np.take_along_axis(cand_s, order, 1)
        best_i = np.take_along_axis(cand_i, order, 1)
    return best_s, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (Q, k) present in the same row of ``found`` (Q, k)."""
    hits = [len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]
    return float(np.mean(hits))
