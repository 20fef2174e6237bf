"""Catalog: an :class:`Index` plus the metadata of every indexed id, searched in-process.

An index folder written by ``clipkit index`` holds ``index.faiss``, ``index.json`` and
``metadata.parquet`` (one row per indexed id). The service and notebooks use the same object.

Example:
    >>> cat = Catalog.load("coco_index")
    >>> hits = cat.search(emb.encode_text(["a dog"]), k=5, model_id=emb.model_id)
    >>> hits[0][0]  # {"id": 17, "score": 0.31, "key": ..., "caption": ..., ...}
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.embed.index import Index

METADATA_FILE = "metadata.parquet"


class Catalog:
    """Index + id -> metadata row.

    Attributes:
        index: the vector index.
        metadata: pandas DataFrame with an ``id`` column (one row per indexed id).
    """

    def __init__(self, index: Index, metadata: Any) -> None:
        self.index = index
        self.metadata = metadata.reset_index(drop=True)
        ids = self.metadata["id"].to_numpy(np.int64)
        self._row = {int(i): r for r, i in enumerate(ids)}

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """Load an index folder (``index.faiss``, ``index.json``, ``metadata.parquet``).

        Raises:
            ValueError: a file is missing.
        """
        import pandas as pd

        p = Path(path).expanduser()
        index = Index.load(p)
        if not (p / METADATA_FILE).is_file():
            raise ValueError(f"index folder {p} has no {METADATA_FILE}")
        return cls(index, pd.read_parquet(p / METADATA_FILE))

    def row(self, id_: int) -> dict[str, Any] | None:
        """Metadata of one id as a JSON-safe dict (None when unknown)."""
        r = self._row.get(int(id_))
        if r is None:
            return None
        out = {}
        for k, v in self.metadata.iloc[r].items():
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            out[str(k)] = v
        return out

    def search(
        self, queries: np.ndarray, k: int = 10, model_id: str | None = None
    ) -> list[list[dict[str, Any]]]:
        """Top-``k`` hits with metadata for each query in ``queries`` (Q, D).

        Returns:
            Q lists of up to ``k`` dicts ``{"id", "score", **metadata}``, best first.

        Raises:
            ValueError: as :meth:`Index.search` (dimension, k, model mismatch).
        """
        scores, ids = self.index.search(queries, k, model_id=model_id)
        out = []
        for srow, irow in zip(scores, ids):
            hits = []
            for s, i in zip(srow, irow):
                if i < 0:
                    continue
                hit = {**(self.row(i) or {}), "id": int(i), "score": float(s)}
                hits.append(hit)
            out.append(hits)
        return out
