"""Embed a whole data set into partitioned float16 ``.npy`` + ``.parquet`` metadata.

Layout (as clip-retrieval writes it)::

    out/embeddings.json                 model, modality, partition size, input, per-partition counts
    out/img_emb/img_emb_{p}.npy         (n_p, D) float16, L2-normalised
    out/text_emb/text_emb_{p}.npy       (n_p, D) float16
    out/metadata/metadata_{p}.parquet   id, key, path, url, caption, json fields; row i <-> vector i

Partition ``p`` holds records ``p * partition_size ...``; a partition is finished when its parquet
file exists (written last), so a rerun skips finished partitions. Unreadable images are skipped
and counted (their ids are simply absent).

The manifest also records a fingerprint of the input (:func:`clipkit.data.sources.fingerprint`:
file names, sizes, modified times and, for a caption file, a hash of its first MiB). A rerun
resumes only when input, fingerprint, model, modality and partition size all match; otherwise it
stops, because finished partitions of the old input would silently mix with new ones.
``overwrite=True`` deletes the old partitions first.

For shards, the manifest also counts the shards cut short by truncation or corruption
(``skipped_shards``, read up to the damage, with ``skipped_shard_examples``) and the incomplete
samples dropped there (``incomplete_samples``; they never become records, so take no id).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from clipkit.data.sources import Source, TarMember, damage_report, fingerprint, image_bytes
from clipkit.data.tar_samples import TarStats
from clipkit.embed.embedder import Embedder, load_image
from clipkit.embed.sources import Record, iter_records, open_input
from clipkit.train.outputs import check_output_folder, write_failed, write_file, write_text

MODALITIES = ("auto", "image", "text", "both")
MANIFEST = "embeddings.json"
# (sub-folder, file-name prefix) of every partition file a run writes, .tmp files included.
PARTITION_FILES = (("img_emb", "img_emb_"), ("text_emb", "text_emb_"), ("metadata", "metadata_"))


def _paths(out: Path, p: int) -> dict[str, Path]:
    return {
        "image": out / "img_emb" / f"img_emb_{p}.npy",
        "text": out / "text_emb" / f"text_emb_{p}.npy",
        "meta": out / "metadata" / f"metadata_{p}.parquet",
    }


def _save_npy(path: Path, x: np.ndarray) -> None:
    _mkdir(path.parent)
    write_file(path, lambda tmp: np.save(tmp, x), f"embeddings {path.name}")


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failed("embeddings", folder, err) from None


def check_output(out_dir: str | Path) -> None:
    """Fail in one line, before any work (model load, input scan), when ``out_dir`` cannot be
    an embeddings folder: a file, an unwritable folder, or a non-empty folder that holds no
    embedding run (another tool's folder, most likely a wrong path: its files are not ours to
    mix partitions into).

    Raises:
        ValueError: one line naming ``--output`` and the path.
    """
    out = Path(out_dir).expanduser()
    check_output_folder(out, "--output")
    # Partition files without a manifest get their own message when the input is known.
    if out.is_dir() and not (out / MANIFEST).is_file() and not _partition_files(out):
        ours = {MANIFEST} | {sub for sub, _ in PARTITION_FILES}
        others = sorted(f.name for f in out.iterdir() if f.name not in ours)
        # dot files and a manifest's temporary copy (a run killed while writing it) pass
        others = [n for n in others if not n.startswith((".", MANIFEST))]
        if others:
            raise ValueError(
                f"--output {out} is not empty and holds no {MANIFEST} (it has {others[0]}"
                f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); choose a new "
                "or empty folder"
            )


def input_fingerprint(spec: str | Source, kind: str) -> dict[str, Any]:
    """What the input of an embedding run looked like (:func:`clipkit.data.sources.fingerprint`).

    ``kind`` (the ``clipkit embed`` kind) is recorded in place of the layer's finer kind, so
    folders fingerprinted before the input layer existed still compare.

    Returns:
        ``{"kind", "files", "bytes", "sha256"}``.
    """
    src = spec if isinstance(spec, Source) else open_input(spec, kind)[0]
    return {**fingerprint(src), "kind": kind}


def _resume_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How the settings/input of ``new`` differ from those of the earlier run ``old``."""
    changes = []
    for key in ("input", "kind", "modality", "partition_size"):
        if key in old and old[key] != new[key]:
            changes.append(f"{key} was {old[key]!r}, now {new[key]!r}")
    if old["model"]["model_id"] != new["model"]["model_id"]:
        changes.append(f"model was {old['model']['model_id']}, now {new['model']['model_id']}")
    a, b = old.get("fingerprint"), new["fingerprint"]
    # Folders made before fingerprints existed have none; there is nothing to compare then.
    # A changed kind is reported above and makes every file look different.
    if a and a.get("kind") == b["kind"] and a != b:
        if (a["files"], a["bytes"]) != (b["files"], b["bytes"]):
            changes.append(
                f"input had {a['files']} files of {a['bytes']} bytes, now {b['files']} files "
                f"of {b['bytes']} bytes"
            )
        else:
            changes.append("input files were renamed, modified or touched (same count and size)")
    return changes


def _partition_files(out: Path) -> list[Path]:
    return [f for sub, stem in PARTITION_FILES for f in sorted((out / sub).glob(f"{stem}*"))]


def _clear(out: Path) -> None:
    """Delete what an earlier run wrote into ``out``, and nothing else.

    The manifest goes first: if this is interrupted, the leftover partitions have no manifest and
    a rerun refuses them instead of resuming from them.
    """
    (out / MANIFEST).unlink(missing_ok=True)
    for f in _partition_files(out):
        f.unlink()
    for sub, _ in PARTITION_FILES:
        with contextlib.suppress(OSError):  # not there, or holds files of someone else
            (out / sub).rmdir()


def _metadata_frame(recs: list[Record]) -> Any:
    import pandas as pd

    rows = []
    for r in recs:
        row = {"id": r.id, "key": r.key, "path": r.path, "url": r.url, "caption": r.caption}
        row.update({k: v for k, v in r.meta.items() if k not in row})
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else ["id", "key", "path", "url", "caption"])
    df["id"] = df["id"].astype("int64")
    return df


def _embed_partition(
    emb: Embedder, recs: list[Record], modalities: list[str], batch_size: int
) -> tuple[list[Record], dict[str, np.ndarray], int]:
    """Embed one partition; returns kept records, arrays per modality and the number skipped."""
    out: dict[str, np.ndarray] = {}
    skipped = 0
    if "image" in modalities:
        kept, chunks = [], []
        for s in range(0, len(recs), 256):  # decode a chunk, drop unreadable images, embed
            imgs, ok = [], []
            for r in recs[s : s + 256]:
                try:
                    if r.image is None:
                        raise ValueError("no image")
                    # A tar member is read by offset only now, so a partition never holds
                    # more than one chunk of encoded images.
                    img = image_bytes(r.image) if isinstance(r.image, TarMember) else r.image
                    imgs.append(load_image(img, emb.max_pixels, f"record {r.id}"))
                    ok.append(r)
                except ValueError:
                    skipped += 1
            if imgs:
                chunks.append(emb.encode_image(imgs, batch_size=batch_size, progress=False))
            kept += ok
        recs = kept
        out["image"] = np.concatenate(chunks) if chunks else np.zeros((0, emb.dim), np.float32)
    if "text" in modalities:
        texts = [r.caption or "" for r in recs]
        out["text"] = emb.encode_text(texts, batch_size=max(batch_size, 256), progress=False)
    return recs, {k: v.astype(np.float16) for k, v in out.items()}, skipped


def embed_dataset(
    embedder: Embedder,
    input_spec: str,
    out_dir: str | Path,
    kind: str = "auto",
    modality: str = "auto",
    partition_size: int = 10_000,
    batch_size: int = 64,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Embed every record of ``input_spec`` into ``out_dir`` (resumable).

    Args:
        embedder: the model.
        input_spec: shard spec / image folder / caption file (see :mod:`clipkit.embed.sources`).
        out_dir: output folder (layout in the module docstring).
        kind: ``auto``/``shards``/``folder``/``captions``.
        modality: ``image``, ``text``, ``both`` or ``auto`` (both for shards and captioned
            image lists, image for folders, text for caption-only files).
        partition_size: records per partition.
        batch_size: images per forward pass.
        progress: show a progress bar over records.
        overwrite: delete the partitions of an earlier run in ``out_dir`` and start afresh,
            instead of resuming from them.

    Returns:
        The manifest dict (also written to ``out_dir/embeddings.json``).

    Raises:
        ValueError: bad arguments, unreadable input, or an output folder made from another
            input, by another model or with other settings (and ``overwrite`` not set).
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality '{modality}'; valid: {', '.join(MODALITIES)}")
    if partition_size < 1:
        raise ValueError(f"partition_size must be >= 1, got {partition_size}")
    check_output(out_dir)
    src, kind = open_input(str(input_spec), kind)
    stats = TarStats()
    records = iter_records(src, kind, stats)
    first = next(records, None)
    if first is None:
        damage = f" ({stats.problems[0]})" if stats.problems else ""
        raise ValueError(f"input '{input_spec}': no records{damage}")
    if modality == "auto":
        modality = "image" if kind == "folder" else "text" if first.image is None else "both"
    if modality in ("image", "both") and first.image is None:
        raise ValueError(f"input '{input_spec}' has no images; use modality text")
    mods = ["image", "text"] if modality == "both" else [modality]
    out = Path(out_dir).expanduser()
    manifest: dict[str, Any] = {
        "model": embedder.info(),
        "modality": modality,
        "partition_size": partition_size,
        "input": str(input_spec),
        "kind": kind,
        "fingerprint": input_fingerprint(src, kind),
        "complete": False,
        "partitions": {},
    }
    manifest["partitions"] = _prepare_output(out, manifest, overwrite)
    mpath = out / MANIFEST
    # Written before the first partition, so partition files never exist without a manifest.
    _write_manifest(mpath, manifest, stats)
    from tqdm import tqdm

    stream = itertools.chain([first], records)
    bar = tqdm(desc="embed", unit="rec", disable=not progress)
    for p in itertools.count():
        chunk = list(itertools.islice(stream, partition_size))
        if not chunk:
            break
        paths = _paths(out, p)
        if paths["meta"].is_file() and all(paths[m].is_file() for m in mods):
            if str(p) not in manifest["partitions"]:  # finished, but the manifest missed it
                import pyarrow.parquet as pq

                kept = pq.ParquetFile(paths["meta"]).metadata.num_rows
                manifest["partitions"][str(p)] = {
                    "records": len(chunk),
                    "kept": kept,
                    "skipped": len(chunk) - kept,
                }
            bar.update(len(chunk))  # finished in an earlier run
            continue
        kept, arrays, skipped = _embed_partition(embedder, chunk, mods, batch_size)
        for m in mods:
            _save_npy(paths[m], arrays[m])
        df = _metadata_frame(kept)
        _mkdir(paths["meta"].parent)
        write_file(paths["meta"], partial(df.to_parquet, index=False), "metadata")
        manifest["partitions"][str(p)] = {
            "records": len(chunk),
            "kept": len(kept),
            "skipped": skipped,
        }
        _write_manifest(mpath, manifest, stats)
        bar.update(len(chunk))
    bar.close()
    manifest["complete"] = True
    _write_manifest(mpath, manifest, stats)
    return manifest


def _write_manifest(path: Path, manifest: dict[str, Any], stats: TarStats) -> None:
    """Write ``manifest`` with the shard damage counted so far (shard inputs only)."""
    if manifest["kind"] == "shards":
        manifest.update(damage_report(stats))
    write_text(path, json.dumps(manifest, indent=2), "embeddings manifest")


def _prepare_output(out: Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Make ``out`` ready for the run ``manifest``; returns the partitions it may resume from.

    Raises:
        ValueError: ``out`` holds a run that differs from ``manifest``, or partition files
            without a manifest, and ``overwrite`` is not set.
    """
    mpath = out / MANIFEST
    if overwrite:
        _clear(out)
    elif mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except ValueError as err:
            msg = f"{mpath}: unreadable ({err}); pass --overwrite to start afresh"
            raise ValueError(msg) from err
        changes = _resume_changes(old, manifest)
        if changes:
            raise ValueError(
                f"{out}: cannot resume, {'; '.join(changes)}; pass --overwrite to delete its "
                "partitions and embed afresh, or choose a new --output"
            )
        return old.get("partitions", {})
    elif _partition_files(out):
        raise ValueError(
            f"{out}: holds partition files but no {MANIFEST}; pass --overwrite to delete them "
            "and embed afresh, or choose a new --output"
        )
    _mkdir(out)
    return {}


def load_embeddings(emb_dir: str | Path, modality: str = "image") -> tuple[np.ndarray, Any, dict]:
    """Read all partitions of ``emb_dir`` back.

    Returns:
        ``(vectors (N, D) float16, metadata DataFrame with N rows, manifest)``.

    Raises:
        ValueError: not an embeddings folder, or it has no ``modality`` vectors.
    """
    import pandas as pd

    d = Path(emb_dir).expanduser()
    if not (d / MANIFEST).is_file():
        raise ValueError(f"not an embeddings folder (no {MANIFEST}): {d}")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        parts = sorted(int(p) for p in manifest.get("partitions", {}))
        missing = [k for k in ("dim", "model_id") if k not in manifest["model"]]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{d / MANIFEST}: not an embeddings manifest ({what})") from None
    if missing:
        bad = f"model has no '{missing[0]}'"
        raise ValueError(f"{d / MANIFEST}: not an embeddings manifest ({bad})")
    key = {"image": "image", "text": "text"}.get(modality)
    if key is None:
        raise ValueError(f"modality must be image or text, got '{modality}'")
    vecs, metas = [], []
    for p in parts:
        paths = _paths(d, p)
        if not paths[key].is_file():
            raise ValueError(f"{d}: no {modality} embeddings ({paths[key].name} missing)")
        vecs.append(np.load(paths[key]))
        metas.append(pd.read_parquet(paths["meta"]))
    dim = manifest["model"]["dim"]
    x = np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float16)
    meta = pd.concat(metas, ignore_index=True) if metas else pd.DataFrame({"id": []})
    return x, meta, manifest
