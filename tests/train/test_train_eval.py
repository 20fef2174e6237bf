"""In-training evaluation is ``clipkit eval``: same evaluators, readers and numbers; inputs checked
at the start of a run.

Tiny runs of the digits demo evaluate zero-shot on a few real CIFAR-10 images, once as an
ImageFolder tar and once in CLIP_benchmark's WebDataset layout; the CLI then evaluates the run's
export on the same data, and the metrics must agree within 1e-6.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipkit.cli import main as clipkit_main
from clipkit.train.cli import main as train_main

PER_CLASS = 3
TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}."]


@pytest.fixture(scope="module")
def cifar_images(data_root) -> list[tuple[str, str, bytes]]:
    """``(class, file name, JPEG bytes)`` of the first PER_CLASS CIFAR-10 test images per class."""
    out, seen = [], {}
    with tarfile.open(data_root / "cifar10" / "test.tar") as tf:
        for m in tf:
            parts = m.name.removeprefix("./").split("/")
            if not m.isfile() or len(parts) != 2 or seen.get(parts[0], 0) >= PER_CLASS:
                continue
            seen[parts[0]] = seen.get(parts[0], 0) + 1
            out.append((parts[0], parts[1], tf.extractfile(m).read()))
    assert len(out) == 10 * PER_CLASS
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _reencode(data: bytes, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def _image_folder_tar(root: Path, images) -> Path:
    path = root / "cifar_tiny.tar"
    with tarfile.open(path, "w") as tf:
        for cls, name, data in images:
            _add(tf, f"./{cls}/{name}", data)
    return path


def _clip_benchmark_layout(root: Path, images) -> Path:
    """classnames.txt, zeroshot_classification_templates.txt, test/{0,1}.tar, test/nshards.txt;
    shard 0 holds ``cls`` + ``webp``, shard 1 ``cls`` + ``jpg`` (both occur in CLIP_benchmark)."""
    from clipkit.eval import load_classnames

    names = load_classnames("cifar10")
    d = root / "wds_cifar_tiny"
    (d / "test").mkdir(parents=True)
    (d / "classnames.txt").write_text("\n".join(names) + "\n")
    (d / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (d / "test" / "nshards.txt").write_text("2\n")
    half = len(images) // 2
    for shard, (chunk, ext, fmt) in enumerate(
        ((images[:half], "webp", "WEBP"), (images[half:], "jpg", "JPEG"))
    ):
        with tarfile.open(d / "test" / f"{shard}.tar", "w") as tf:
            for i, (cls, _, data) in enumerate(chunk):
                key = f"s{shard}_{i:04d}"
                _add(tf, f"{key}.cls", str(names.index(cls)).encode())
                _add(tf, f"{key}.{ext}", _reencode(data, fmt))
    return d


def _train_argv(tmp_path: Path, cache: Path, run: str) -> list[str]:
    return [
        f"data.cache_dir={cache}",
        f"train.output_dir={tmp_path / run}",
        "data.builtin=digits",
        "train.batch_size=32",
        "train.max_steps=2",
        "train.log_every=1",
        "train.trackers=[]",
        "optim.warmup_steps=1",
        "optim.lr=1e-3",
        "train.torch_threads=2",
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("layout", ["imagefolder_tar", "clip_benchmark_wds"])
def test_in_training_zeroshot_equals_cli(layout, cifar_images, cache, tmp_path, capsys) -> None:
    if layout == "imagefolder_tar":
        data = _image_folder_tar(tmp_path, cifar_images)
        names = ["eval.classnames=cifar10", "eval.templates=cifar10"]
        cli_names = ["--classnames", "cifar10", "--templates", "cifar10"]
        dataset = "cifar_tiny"
    else:  # empty eval.classnames/templates: the layout's own files, as the CLI's defaults
        data = _clip_benchmark_layout(tmp_path, cifar_images)
        names = ["eval.classnames=", "eval.templates="]
        cli_names = []
        dataset = "wds_cifar_tiny"
    run = tmp_path / "run"
    argv = _train_argv(tmp_path, cache, "run") + [f"eval.zeroshot={data}", *names]
    assert train_main(argv) == 0, capsys.readouterr().err[-2000:]
    trained = json.loads((run / "metrics.json").read_text())
    assert not any(k.endswith("/error") for k in trained), trained
    prefix = f"eval/zeroshot/{dataset}/"
    assert trained[prefix + "n"] == 10 * PER_CLASS
    assert trained[prefix + "skipped"] == 0 and trained[prefix + "skipped_shards"] == 0

    out = tmp_path / "cli.json"
    argv = ["eval", "zeroshot", "--model", str(run / "export"), "--data", str(data), *cli_names,
            "--output", str(out), "--workers", "0", "--no-progress"]  # fmt: skip
    rc = clipkit_main(argv)
    assert rc == 0, capsys.readouterr().err[-2000:]
    cli = json.loads(out.read_text())
    assert cli["n_samples"] == 10 * PER_CLASS and cli["dataset"] == dataset
    assert set(cli["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    diffs = {k: abs(trained[prefix + k] - v) for k, v in cli["metrics"].items()}
    print(f"{layout}: max |in-training - CLI| = {max(diffs.values()):.3g}", diffs)
    assert max(diffs.values()) <= 1e-6, (diffs, cli["metrics"])


# --------------------------------------------------------------------------- check_eval_inputs
@pytest.fixture(scope="module")
def digits_model():
    from clipkit.config.schema import ModelConfig
    from clipkit.models import build_dual_encoder

    return build_dual_encoder(ModelConfig(name="clipkit-digits")).eval()


def _cfg(cache: Path, **evals: str):
    from clipkit.config.schema import Config

    cfg = Config()
    cfg.data.cache_dir = str(cache)
    for k, v in evals.items():
        setattr(cfg.eval, k, v)
    return cfg


def _problem(cfg, model) -> str:
    from clipkit.train.evaluation import check_eval_inputs

    with pytest.raises(ValueError) as info:
        check_eval_inputs(cfg, model)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


def test_check_eval_inputs_accepts_what_evaluation_reads(
    cifar_images, cache, digits_model, tmp_path
) -> None:
    from clipkit.train.evaluation import check_eval_inputs

    check_eval_inputs(_cfg(cache), digits_model)  # the built-in digits test shards (cls)
    tar = _image_folder_tar(tmp_path, cifar_images)
    check_eval_inputs(_cfg(cache, zeroshot=str(tar), classnames="cifar10"), digits_model)
    wds = _clip_benchmark_layout(tmp_path, cifar_images)
    check_eval_inputs(_cfg(cache, zeroshot=str(wds), classnames="", templates=""), digits_model)


def test_check_eval_inputs_names_key_path_and_problem(
    cifar_images, cache, digits_model, tmp_path, data_root
) -> None:
    missing = tmp_path / "nope" / "test.tar"
    assert _problem(_cfg(cache, zeroshot=str(missing)), digits_model) == (
        f"eval.zeroshot={missing}: not found"
    )
    tar = _image_folder_tar(tmp_path, cifar_images)
    bad = tmp_path / "bad_templates.txt"
    bad.write_text("a photo\n")
    msg = _problem(_cfg(cache, zeroshot=str(tar), templates=str(bad)), digits_model)
    assert msg.startswith(f"eval.zeroshot={tar}: ") and "placeholder" in msg
    # CIFAR folder names with a 3-name class file: the counts differ.
    names = tmp_path / "three.txt"
    names.write_text("cat\ndog\nbird\n")
    msg = _problem(_cfg(cache, zeroshot=str(tar), classnames=str(names)), digits_model)
    assert msg.startswith(f"eval.zeroshot={tar}: ") and "3 names" in msg and "10 classes" in msg
    # CLIP_benchmark layout whose nshards.txt lists a shard that is not there.
    wds = _clip_benchmark_layout(tmp_path, cifar_images)
    (wds / "test" / "nshards.txt").write_text("3\n")
    msg = _problem(_cfg(cache, zeroshot=str(wds), classnames="", templates=""), digits_model)
    assert msg.startswith(f"eval.zeroshot={wds}: shard not found") and "2.tar" in msg
    # Shards without labels (image-caption shards) are no zero-shot set.
    caps = tmp_path / "caps.tar"
    with tarfile.open(caps, "w") as tf:
        _add(tf, "k0.jpg", cifar_images[0][2])
        _add(tf, "k0.txt", b"a photo")
    msg = _problem(_cfg(cache, zeroshot=str(caps), classnames="cifar10"), digits_model)
    assert msg.startswith(f"eval.zeroshot={caps}: ") and "no 'cls' label" in msg
    # A caption table whose images are all missing.
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("filepath\tcaption\nmissing.jpg\ta photo\n")
    msg = _problem(_cfg(cache, retrieval=str(tsv)), digits_model)
    assert msg.startswith(f"eval.retrieval={tsv}: no readable image") and "missing.jpg" in msg
    msg = _problem(_cfg(cache, retrieval=str(tmp_path / "none.tsv")), digits_model)
    assert msg == f"eval.retrieval={tmp_path / 'none.tsv'}: not found"
