"""HNSW with float32 vs float16 vs 8-bit vector storage: latency and recall at equal efSearch.

Answers whether compressing the stored vectors (faiss ``IndexHNSWSQ``) buys single-query speed
on this machine; it did not (see bench/README.md), so clipkit keeps ``IndexHNSWFlat``.

Run (timing runs never overlap on the shared machine):
    flock /tmp/clipkit-bench.lock python bench/index_storage.py --n 200000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from index import lowrank_vectors  # noqa: E402

from clipkit.embed.index import exact_search, recall_at_k  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef-search", default="64,128")
    a = ap.parse_args()
    import faiss

    x = lowrank_vectors(a.n, a.dim, 3, 32, 0.1)
    q = lowrank_vectors(a.queries, a.dim, 4, 32, 0.1)
    _, truth = exact_search(x, q, 10)  # (Q, 10)
    sq = faiss.ScalarQuantizer
    print(f"faiss {faiss.__version__}; lowrank vectors n={a.n} d={a.dim}; M=32")
    print("| storage | build s | efSearch | recall@10 | p50 ms | distances/query |")
    print("|---|---|---|---|---|---|")
    for name, qtype in (("float32", None), ("float16", sq.QT_fp16), ("8-bit", sq.QT_8bit)):
        ip = faiss.METRIC_INNER_PRODUCT
        if qtype is None:
            idx = faiss.IndexHNSWFlat(a.dim, 32, ip)
        else:
            idx = faiss.IndexHNSWSQ(a.dim, qtype, 32, ip)
        idx.hnsw.efConstruction = a.ef_construction
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        if not idx.is_trained:
            idx.train(x[:50_000])
        t = time.perf_counter()
        idx.add(x)
        build = time.perf_counter() - t
        faiss.omp_set_num_threads(1)  # single-query latency, as a service sees it
        for ef in [int(e) for e in a.ef_search.split(",")]:
            idx.hnsw.efSearch = ef
            faiss.cvar.hnsw_stats.reset()
            lat, found = [], []
            for i in range(len(q)):
                t = time.perf_counter()
                found.append(idx.search(q[i : i + 1], 10)[1][0])
                lat.append(1000 * (time.perf_counter() - t))
            rec = recall_at_k(np.asarray(found), truth)
            nd = faiss.cvar.hnsw_stats.ndis / len(q)
            print(f"| {name} | {build:.0f} | {ef} | {rec:.3f} | {np.median(lat):.2f} | {nd:.0f} |")


if __name__ == "__main__":
    main()
