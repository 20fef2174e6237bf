"""clipkit embed: partitions, metadata alignment, resume, every input kind."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from embed_helpers import make_images

from clipkit.cli import main
from clipkit.embed.dataset import embed_dataset, load_embeddings


def _shards(tmp_path, n: int = 7, per: int = 4):
    import webdataset as wds

    imgs = make_images(n, seed=1)
    for s in range((n + per - 1) // per):
        with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as w:
            for i in range(s * per, min(n, (s + 1) * per)):
                buf = io.BytesIO()
                imgs[i].save(buf, format="JPEG")
                jpg = buf.getvalue() if i != 3 else b"broken jpeg"
                meta = {"url": f"http://x/{i}.jpg", "width": 50, "tags": ["a", str(i)]}
                w.write({"__key__": f"{i:05d}", "jpg": jpg, "txt": f"caption {i}", "json": meta})
    return imgs


def test_shards_partitions_and_alignment(embedder, tmp_path) -> None:
    imgs = _shards(tmp_path)
    out = tmp_path / "emb"
    man = embed_dataset(embedder, str(tmp_path / "shard-{000..001}.tar"), out, partition_size=3)
    assert man["modality"] == "both" and len(man["partitions"]) == 3
    assert man["partitions"]["1"] == {"records": 3, "kept": 2, "skipped": 1}  # record 3 broken
    assert np.load(out / "img_emb" / "img_emb_0.npy").dtype == np.float16
    x, meta, _ = load_embeddings(out, "image")
    t, _, _ = load_embeddings(out, "text")
    assert meta["id"].tolist() == [0, 1, 2, 4, 5, 6] and len(x) == len(t) == 6
    assert meta["url"].tolist()[0] == "http://x/0.jpg" and meta["caption"][3] == "caption 4"
    assert json.loads(meta["tags"][0]) == ["a", "0"] and "width" in meta.columns
    # JPEG round trip as the shard stored it; vectors are float16, hence the tolerance.
    jpgs = []
    for i in meta["id"]:
        buf = io.BytesIO()
        imgs[i].save(buf, format="JPEG")
        jpgs.append(buf.getvalue())
    np.testing.assert_allclose(x.astype(np.float32), embedder.encode_image(jpgs), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(x.astype(np.float32), axis=1), 1, atol=2e-3)
    ref_t = embedder.encode_text([f"caption {i}" for i in meta["id"]])
    np.testing.assert_allclose(t.astype(np.float32), ref_t, atol=2e-3)


def test_resume_skips_finished_partitions(embedder, tmp_path) -> None:
    _shards(tmp_path)
    out = tmp_path / "emb"
    spec = str(tmp_path)
    embed_dataset(embedder, spec, out, partition_size=3)
    first = (out / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns
    (out / "metadata" / "metadata_2.parquet").unlink()  # simulate a crash in the last partition
    man = embed_dataset(embedder, spec, out, partition_size=3)
    assert (out / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns == first
    assert (out / "metadata" / "metadata_2.parquet").is_file() and len(man["partitions"]) == 3
    with pytest.raises(ValueError, match="partition_size was 3, now 4; pass --overwrite"):
        embed_dataset(embedder, spec, out, partition_size=4)


def test_folder_and_caption_files(embedder, tmp_path) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(make_images(3)):
        im.save(folder / ("sub" if i == 2 else "") / f"im{i}.png")
    (folder / "im0.txt").write_text("first image")
    man = embed_dataset(embedder, str(folder), tmp_path / "f")
    x, meta, _ = load_embeddings(tmp_path / "f")
    assert man["modality"] == "image" and meta["key"].tolist() == ["im0", "im1", "sub/im2"]
    assert meta["caption"][0] == "first image" and x.shape == (3, embedder.dim)
    tsv = folder / "caps.tsv"
    tsv.write_text("filepath\ttitle\nim0.png\ta\nim1.png\tb\nim0.png\tc\n")
    embed_dataset(embedder, str(tsv), tmp_path / "c")
    _, meta, man = load_embeddings(tmp_path / "c", "text")
    assert man["modality"] == "both" and meta["caption"].tolist() == ["a", "b"]
    assert json.loads(meta["captions"][0]) == ["a", "c"]
    txt = folder / "lines.txt"
    txt.write_text("one\ntwo\n")
    assert embed_dataset(embedder, str(txt), tmp_path / "t")["modality"] == "text"
    with pytest.raises(ValueError, match="no image"):
        load_embeddings(tmp_path / "t", "image")


def test_cli_one_line_errors(tiny_export, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):  # argparse: --output missing
        main(["embed", "--model", str(tiny_export), "--input", str(tmp_path / "nope.tsv")])
    capsys.readouterr()
    rc = main(
        ["embed", "--model", str(tiny_export), "--input", str(tmp_path / "x"), "--output", "o"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not found" in err[0]
