"""clipkit embed resume: an unchanged input resumes, a changed one is refused, --overwrite."""

from __future__ import annotations

import json
import os

import pytest
from embed_helpers import make_images

from clipkit.cli import main
from clipkit.embed import dataset
from clipkit.embed.dataset import embed_dataset, load_embeddings


@pytest.fixture
def count_embeds(monkeypatch) -> list[int]:
    """Records of each partition actually embedded (not resumed), one entry per partition."""
    calls: list[int] = []
    real = dataset._embed_partition

    def spy(emb, recs, mods, batch_size):
        calls.append(len(recs))
        return real(emb, recs, mods, batch_size)

    monkeypatch.setattr(dataset, "_embed_partition", spy)
    return calls


def _lines(path, n: int) -> str:
    path.write_text("".join(f"sentence number {i}\n" for i in range(n)))
    return str(path)


def test_unchanged_input_resumes_only_missing_partitions(embedder, tmp_path, count_embeds):
    src, out = _lines(tmp_path / "lines.txt", 10), tmp_path / "emb"
    man = embed_dataset(embedder, src, out, partition_size=4, progress=False)
    assert count_embeds == [4, 4, 2] and man["complete"] is True
    assert man["fingerprint"]["files"] == 1 and man["fingerprint"]["kind"] == "captions"
    kept = {p: (out / "text_emb" / f"text_emb_{p}.npy").stat().st_mtime_ns for p in (0, 1)}
    (out / "metadata" / "metadata_2.parquet").unlink()  # a run interrupted in the last partition
    man = embed_dataset(embedder, src, out, partition_size=4, progress=False)
    assert count_embeds == [4, 4, 2, 2]  # only partition 2 again
    assert all((out / "text_emb" / f"text_emb_{p}.npy").stat().st_mtime_ns == t
               for p, t in kept.items())  # fmt: skip
    x, meta, _ = load_embeddings(out, "text")
    assert meta["id"].tolist() == list(range(10)) and len(x) == 10
    embed_dataset(embedder, src, out, partition_size=4, progress=False)
    assert len(count_embeds) == 4  # everything finished: nothing embedded


def test_changed_caption_file_is_refused(embedder, tmp_path) -> None:
    src, out = _lines(tmp_path / "lines.txt", 10), tmp_path / "emb"
    embed_dataset(embedder, src, out, partition_size=4, progress=False)
    _lines(tmp_path / "lines.txt", 11)  # one more line
    with pytest.raises(ValueError, match="had 1 files of 180 bytes, now 1 files of 199 bytes"):
        embed_dataset(embedder, src, out, partition_size=4, progress=False)
    text = (tmp_path / "lines.txt").read_text()
    (tmp_path / "lines.txt").write_text(text.replace("number 9", "number X"))  # same size
    man = embed_dataset(embedder, src, out, partition_size=4, progress=False, overwrite=True)
    assert sum(p["records"] for p in man["partitions"].values()) == 11
    st = os.stat(src)
    (tmp_path / "lines.txt").write_text(text.replace("number 9", "number Y"))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the hash tells
    with pytest.raises(ValueError, match="renamed, modified or touched"):
        embed_dataset(embedder, src, out, partition_size=4, progress=False)
    with pytest.raises(ValueError, match="modality was 'text', now 'both'"):
        tsv = tmp_path / "caps.tsv"
        make_images(1)[0].save(tmp_path / "a.png")
        tsv.write_text("filepath\ttitle\na.png\tx\n")
        embed_dataset(embedder, str(tsv), out, progress=False)


def test_changed_folder_is_refused_and_overwrite_clears_only_partitions(
    embedder, tmp_path, count_embeds
) -> None:
    folder, out = tmp_path / "imgs", tmp_path / "emb"
    folder.mkdir()
    for i, im in enumerate(make_images(5, seed=3)):
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    embed_dataset(embedder, str(folder), out, partition_size=2, progress=False)
    assert len(count_embeds) == 3
    embed_dataset(embedder, str(folder), out, partition_size=2, progress=False)
    assert len(count_embeds) == 3  # unchanged: resumed, nothing embedded
    (folder / "4.txt").write_text("picture X")  # a caption changed: same size, other mtime
    st = os.stat(folder / "4.txt")
    os.utime(folder / "4.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))  # coarse clocks
    with pytest.raises(ValueError, match=r"emb: cannot resume, input files were renamed"):
        embed_dataset(embedder, str(folder), out, partition_size=2, progress=False)
    (folder / "4.png").unlink()
    (out / "notes.txt").write_text("mine")  # not ours: --overwrite must keep it
    (out / "metadata" / "keep.csv").write_text("mine")
    with pytest.raises(ValueError, match="input had 10 files of .* now 8 files"):
        embed_dataset(embedder, str(folder), out, partition_size=2, progress=False)
    man = embed_dataset(
        embedder, str(folder), out, partition_size=2, progress=False, overwrite=True
    )
    assert len(man["partitions"]) == 2 and not (out / "img_emb" / "img_emb_2.npy").exists()
    assert (out / "notes.txt").is_file() and (out / "metadata" / "keep.csv").is_file()
    assert load_embeddings(out)[1]["caption"].tolist() == [f"picture {i}" for i in range(4)]
    (out / "embeddings.json").unlink()  # partitions whose manifest is gone are not trusted
    with pytest.raises(ValueError, match="holds partition files but no embeddings.json"):
        embed_dataset(embedder, str(folder), out, partition_size=2, progress=False)


def test_cli_changed_input_one_line_error_and_overwrite(tiny_export, tmp_path, capsys) -> None:
    src, out = _lines(tmp_path / "lines.txt", 6), tmp_path / "emb"
    args = ["embed", "--model", str(tiny_export), "--input", src, "--output", str(out)]
    assert main([*args, "--partition-size", "4"]) == 0
    capsys.readouterr()
    _lines(tmp_path / "lines.txt", 3)
    assert main([*args, "--partition-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0], err
    assert main([*args, "--partition-size", "5"]) == 2
    assert "partition_size was 4, now 5" in capsys.readouterr().err
    assert main([*args, "--partition-size", "4", "--overwrite"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["records"] == 3 and s["partitions"] == 1
