"""``clipkit index``: build or extend a faiss index from ``clipkit embed`` output.

Example:
    clipkit index --embeddings /tmp/coco_emb --output /tmp/coco_index --audit 200
    clipkit index --embeddings /tmp/coco_emb --output /tmp/coco_index --add   # new partitions
    clipkit index --embeddings /tmp/cc_emb --output /tmp/coco_index --add     # another data set

``clipkit embed`` numbers records 0..N-1 in every output folder, so two data sets share ids. The
index therefore records each source (embeddings folder + the input it was made from) with an id
offset: index id = offset + the record's id in its folder. A new source gets the next free ids;
a known one (say, after ``clipkit embed`` resumed and wrote more partitions) keeps its offset, so
ids stay stable and only the vectors not yet indexed are added. ``metadata.parquet`` carries the
index id plus ``source_dir`` and ``source_id`` to trace a hit back to its embeddings folder.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.embed.index import HNSW_STORAGE, KINDS, Index
from clipkit.train.outputs import check_output_folder, write_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``clipkit index``."""
    parser.add_argument("--embeddings", required=True, help="folder written by clipkit embed")
    parser.add_argument("--output", required=True, help="index folder")
    parser.add_argument("--modality", default="image", choices=["image", "text"])
    parser.add_argument("--kind", default="auto", choices=KINDS)
    parser.add_argument("--memory-budget-gb", type=float, default=8.0)
    parser.add_argument(
        "--hnsw-storage",
        default="float16",
        choices=HNSW_STORAGE,
        help="how HNSW keeps the vectors (float16: half the memory, faster queries)",
    )
    parser.add_argument(
        "--add", action="store_true", help="add vectors not yet indexed to an existing index"
    )
    parser.add_argument(
        "--id-offset",
        type=int,
        default=None,
        metavar="N",
        help="index ids of a new source start at N (default: after the largest id)",
    )
    parser.add_argument(
        "--audit",
        type=int,
        default=0,
        metavar="N",
        help="report recall@10 against exact search on N sampled queries",
    )


def index_sources(index: Index) -> list[dict[str, Any]]:
    """The sources recorded in ``index.info["sources"]``, one dict each.

    Keys: ``embeddings`` (resolved folder), ``input`` (as its manifest records it), ``offset``,
    ``end`` (one past its largest index id so far) and ``fingerprint`` (of its input, or None).
    Indexes made before offsets existed list bare folder paths; their ids had offset 0.
    """
    out = []
    ids = index.ids()
    for s in index.info.get("sources", []):
        if isinstance(s, str):
            end = int(ids.max()) + 1 if len(ids) else 0
            s = {"embeddings": str(Path(s).expanduser().resolve()), "input": None, "offset": 0}
            s.update(end=end, fingerprint=None)
        out.append(dict(s))
    return out


def _find_source(sources: list[dict], folder: str, manifest: dict) -> dict | None:
    for s in sources:
        if s["embeddings"] == folder and s["input"] in (None, manifest.get("input")):
            return s
    return None


def place_source(
    existing: np.ndarray,
    sources: list[dict[str, Any]],
    emb_dir: str | Path,
    manifest: dict[str, Any],
    local_ids: np.ndarray,
    id_offset: int | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Find or create the source entry of ``emb_dir`` and map its ``local_ids`` to index ids.

    Args:
        existing: (M,) ids already in the index.
        sources: :func:`index_sources` of the index; a new entry is appended to it.
        emb_dir: the embeddings folder.
        manifest: its ``embeddings.json``.
        local_ids: (N,) ids as ``clipkit embed`` wrote them.
        id_offset: offset for a new source (default: after the largest id in use).

    Returns:
        ``(entry, index ids (N,) int64)``; ids already in the index are old vectors of this
        source, the rest are new.

    Raises:
        ValueError: ``id_offset`` differs from a known source's offset or makes ids collide,
            the source's input changed since it was indexed, or it grew into another source's ids.
    """
    folder = str(Path(emb_dir).expanduser().resolve())
    entry = _find_source(sources, folder, manifest)
    if entry is not None:
        if id_offset is not None and id_offset != entry["offset"]:
            raise ValueError(
                f"--id-offset {id_offset}: {emb_dir} is already indexed with offset "
                f"{entry['offset']}, which keeps its ids stable; leave --id-offset out"
            )
        old, new = entry.get("fingerprint"), manifest.get("fingerprint")
        if old and new and old != new:
            raise ValueError(
                f"{emb_dir}: re-embedded from a changed input since it was indexed (offset "
                f"{entry['offset']}); its ids now name other records, so build a new index"
            )
    else:
        if id_offset is None:
            ends = [int(existing.max()) + 1 if len(existing) else 0]
            id_offset = max(ends + [s["end"] for s in sources])
        if id_offset < 0:
            raise ValueError(f"--id-offset must be >= 0, got {id_offset}")
        entry = {"embeddings": folder, "input": manifest.get("input"), "offset": id_offset}
        entry.update(end=id_offset, fingerprint=None)
        sources.append(entry)
    ids = np.asarray(local_ids, dtype=np.int64) + entry["offset"]
    _check_collisions(entry, sources, ids, existing, emb_dir)
    entry["input"] = manifest.get("input")
    entry["fingerprint"] = manifest.get("fingerprint")
    return entry, ids


def _check_collisions(
    entry: dict, sources: list[dict], ids: np.ndarray, existing: np.ndarray, emb_dir: Any
) -> None:
    """Refuse ids that belong to another source, which would drop or mismatch vectors."""
    if not len(ids):
        return
    # The source's own earlier ids are [offset, end); an existing id outside that is not its own.
    own = (ids >= entry["offset"]) & (ids < entry["end"])
    clash = ids[~own & np.isin(ids, existing)]
    for s in sources:
        if s is not entry:
            clash = np.union1d(clash, ids[(ids >= s["offset"]) & (ids < s["end"])])
    if len(clash):
        other = next(
            (s for s in sources if s is not entry and s["offset"] <= clash[0] < s["end"]), None
        )
        whose = f" of {other['embeddings']}" if other else ""
        raise ValueError(
            f"{emb_dir}: with id offset {entry['offset']}, {len(clash)} ids collide with ids "
            f"already in the index{whose} (e.g. {int(clash[0])}); pick a free --id-offset, or "
            "rebuild the index adding the grown source first"
        )


def _check_compatible(index: Index, manifest: dict, modality: str, emb_dir: Any, out: Path) -> None:
    """One-line refusals for vectors that do not belong in ``index``."""
    mine, theirs = index.model.get("model_id"), manifest["model"].get("model_id")
    if mine is not None and theirs != mine:
        raise ValueError(
            f"{emb_dir} holds vectors of model {theirs} ({manifest['model'].get('name', '?')}), "
            f"but this index holds vectors of model {mine} ({index.model.get('name', '?')}) "
            f"at {out}; re-embed with that model or build a new index"
        )
    if index.model.get("modality", modality) != modality:
        raise ValueError(f"{out} indexes {index.model['modality']} vectors, not {modality}")


def _audit_vectors(sources: list[dict], modality: str, index: Index) -> tuple[np.ndarray, Any]:
    """All indexed vectors, read back from every source, for an exact-search audit."""
    from clipkit.embed.dataset import load_embeddings

    indexed, xs, ids = index.ids(), [], []
    for s in sources:
        x, meta, _ = load_embeddings(s["embeddings"], modality)
        g = meta["id"].to_numpy(np.int64) + s["offset"]
        keep = np.isin(g, indexed)
        xs.append(x[keep].astype(np.float32))
        ids.append(g[keep])
    return np.concatenate(xs), np.concatenate(ids)


def run(args: argparse.Namespace) -> int:
    """Run the command; prints a one-line JSON summary."""
    import pandas as pd

    from clipkit.embed.catalog import METADATA_FILE
    from clipkit.embed.dataset import load_embeddings
    from clipkit.embed.index import META_FILE

    check_output_folder(args.output, "--output")  # before any vector is read
    x, meta, manifest = load_embeddings(args.embeddings, args.modality)
    x = x.astype(np.float32)  # (N, D)
    local = meta["id"].to_numpy(np.int64)
    model = {**manifest["model"], "modality": args.modality}
    out = Path(args.output).expanduser()
    exists = (out / META_FILE).is_file()
    if exists and not args.add:
        raise ValueError(f"{out} already holds an index; pass --add to extend it")
    if args.add and not exists:
        raise ValueError(f"--add: no index at {out}")
    old_meta, existing = None, np.zeros(0, np.int64)
    if args.add:
        index = Index.load(out)
        _check_compatible(index, manifest, args.modality, args.embeddings, out)
        old_meta = pd.read_parquet(out / METADATA_FILE)
        sources = index_sources(index)
        if len(sources) == 1 and "source_dir" not in old_meta:  # index from before offsets
            old_meta["source_dir"] = sources[0]["embeddings"]
            old_meta["source_id"] = old_meta["id"]
        existing = index.ids()
    else:
        if len(x) == 0:
            raise ValueError(f"{args.embeddings}: no vectors to index")
        sources = []
    entry, ids = place_source(existing, sources, args.embeddings, manifest, local, args.id_offset)
    new = ~np.isin(ids, existing)
    if args.add:
        if new.any():
            index.add(x[new], ids[new], model_id=model["model_id"], progress=True)
    else:
        index = Index.build(
            x,
            ids,
            kind=args.kind,
            model=model,
            memory_budget_gb=args.memory_budget_gb,
            hnsw_storage=args.hnsw_storage,
            progress=True,
        )
    if new.any():
        entry["end"] = max(entry["end"], int(ids[new].max()) + 1)
    index.info["sources"] = sources
    added = meta[new].assign(id=ids[new], source_dir=entry["embeddings"], source_id=local[new])
    meta = added if old_meta is None else pd.concat([old_meta, added], ignore_index=True)
    index.save(out)
    write_file(out / METADATA_FILE, partial(meta.to_parquet, index=False), "index metadata")
    summary = {
        "output": str(out),
        "kind": index.kind,
        "ntotal": len(index),
        "added": int(new.sum()),
        "source": entry["embeddings"],
        "id_offset": entry["offset"],
        "sources": len(sources),
        "dim": index.dim,
        "model_id": model["model_id"],
    }
    if args.audit:
        ax, aids = (x, ids) if len(sources) == 1 else _audit_vectors(sources, args.modality, index)
        summary.update(index.audit(ax, aids, n_queries=args.audit, k=10))
    print(json.dumps(summary))
    return 0
