"""The embedded digits demo set: counts, labels, captions, split, cache reuse."""

import json
from collections import Counter

import webdataset as wds

from clipkit.data.digits import (
    CLASSNAMES,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    prepare_digits,
    shard_spec,
)


def _read(split_dir):
    ds = wds.WebDataset(shard_spec(split_dir), shardshuffle=False, empty_check=False)
    return list(ds)


def test_digits_to_shards(tmp_path):
    dirs = prepare_digits(tmp_path)
    train, test = _read(dirs["train"]), _read(dirs["test"])
    assert len(train) + len(test) == 1797  # every sklearn digit, once
    assert len(test) == 360
    keys = [s["__key__"] for s in train + test]
    assert len(set(keys)) == len(keys)
    sizes = json.loads((dirs["train"] / "sizes.json").read_text())
    assert sum(sizes.values()) == len(train)

    from sklearn.datasets import load_digits

    target = load_digits().target
    for s in train + test:
        label = int(s["cls"])
        assert label == int(target[int(s["__key__"].removeprefix("digit"))])
        meta = json.loads(s["json"])
        assert meta == {"label": label, "classname": CLASSNAMES[label]}
        caption = s["txt"].decode()
        # Every caption names its digit, as a word or a numeral.
        assert CLASSNAMES[label] in caption.split() or str(label) in caption.split(), caption
        assert s["png"][:8] == b"\x89PNG\r\n\x1a\n"
    # Stratified split: every class in both, captions varied.
    assert set(Counter(int(s["cls"]) for s in test)) == set(range(10))
    assert len({s["txt"] for s in train}) > 50


def test_eval_templates_differ_from_training_captions():
    train_caps = {
        t.format(word=w, num=i) for t in TRAIN_TEMPLATES for i, w in enumerate(CLASSNAMES)
    }
    eval_caps = {t.format(w) for t in EVAL_TEMPLATES for w in CLASSNAMES}
    assert not train_caps & eval_caps


def test_cache_is_reused(tmp_path):
    dirs = prepare_digits(tmp_path)
    stamp = (dirs["train"] / "00000.tar").stat().st_mtime_ns
    prepare_digits(tmp_path)
    assert (dirs["train"] / "00000.tar").stat().st_mtime_ns == stamp


def test_a_build_in_progress_is_waited_for_not_repeated(tmp_path):
    """Every rank of a first run calls prepare_digits at once: a caller that finds another's
    build under way waits for its lock and then reuses the build (before the lock, a late rank
    rebuilt the shards and deleted them under a rank that had already listed them)."""
    import shutil
    import threading

    from filelock import FileLock

    root = tmp_path / "digits"
    root.mkdir()
    result: dict[str, object] = {}
    with FileLock(str(root / ".lock")):  # another process's build, holding the lock
        t = threading.Thread(target=lambda: result.update(dirs=prepare_digits(tmp_path)))
        t.start()
        t.join(timeout=3.0)
        # Waiting, not building (a build's first write is the split folders, within a second).
        assert t.is_alive() and not (root / "train").exists() and not (root / "_done").exists()
        # The holder finishes its build: the waiter must reuse it, not write again.
        prepare_digits(tmp_path / "elsewhere")
        shutil.copytree(tmp_path / "elsewhere" / "digits", root, dirs_exist_ok=True)
        stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")}
    t.join(timeout=120)
    assert not t.is_alive() and result["dirs"] == {"train": root / "train", "test": root / "test"}
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")} == stamps  # not rewritten
    assert len(_read(root / "train")) + len(_read(root / "test")) == 1797
