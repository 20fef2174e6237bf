"""Embedding API, vector index and retrieval service.

``Embedder`` (encode text/images), ``Index`` (faiss, in-process search) and the ``clipkit embed``,
``clipkit index``, ``clipkit serve`` commands. faiss and FastAPI are optional extras, imported only
by the parts that need them.
"""

from clipkit.embed.embedder import Embedder, load_image

__all__ = ["Embedder", "Index", "load_image"]


def __getattr__(name: str):
    if name == "Index":  # faiss is an optional extra: import on first use
        from clipkit.embed.index import Index

        return Index
    raise AttributeError(name)
