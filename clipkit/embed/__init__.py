"""Embedding API, vector index and retrieval service.

``Embedder`` (encode text/images), ``Index`` (faiss, in-process search) and the ``clipkit embed``,
``clipkit index``, ``clipkit serve`` commands. faiss and FastAPI are optional extras, imported only
by the parts that need them; the names are imported on first use, so the torch-free ONNX reader
(``clipkit.embed.onnx_model``) imports without torch.
"""

__all__ = ["Embedder", "Index", "load_image"]


def __getattr__(name: str):
    if name in ("Embedder", "load_image"):  # torch and the model code: import on first use
        from clipkit.embed import embedder

        return getattr(embedder, name)
    if name == "Index":  # faiss is an optional extra: import on first use
        from clipkit.embed.index import Index

        return Index
    raise AttributeError(name)
