"""``clipkit eval zeroshot|retrieval``: results JSON, model loading, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipkit.cli import main
from clipkit.eval import retrieval


@pytest.fixture(scope="module")
def export_dir(micro_model, tmp_path_factory) -> Path:
    return micro_model.export(tmp_path_factory.mktemp("export"))


@pytest.fixture
def folder(tmp_path) -> Path:
    for c, colour in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), colour).save(tmp_path / "data" / c / f"{i}.png")
    return tmp_path / "data"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["eval", *argv, "--no-progress", "--workers", "0"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_zeroshot_json_shape_bootstrap_per_class(export_dir, folder, tmp_path, capsys) -> None:
    (tmp_path / "t.txt").write_text("a {} square.\na photo of {}.\n")
    out = tmp_path / "r.json"
    rc, stdout, _ = _run(
        capsys, "zeroshot", "--model", str(export_dir), "--data", str(folder),
        "--templates", str(tmp_path / "t.txt"), "--output", str(out),
        "--bootstrap", "50", "--per-class",
    )  # fmt: skip
    assert rc == 0 and "acc1=" in stdout
    r = json.loads(out.read_text())
    assert r["task"] == "zeroshot_classification" and r["dataset"] == "data"
    assert set(r["metrics"]) == {"acc1", "mean_per_class_recall"}  # 3 classes: no acc5
    assert r["n_samples"] == 12 and r["n_templates"] == 2 and r["precision"] == "fp32"
    assert set(r["metrics_ci95"]) == set(r["metrics"])
    for k, (lo, hi) in r["metrics_ci95"].items():
        assert lo <= r["metrics"][k] + 1e-9 and r["metrics"][k] <= hi + 1e-9
    assert list(r["per_class"]) == ["blue", "green", "red"]
    assert sum(map(sum, r["confusion_matrix"])) == 12
    assert {"torch", "open_clip", "clipkit"} <= set(r["versions"])


def test_zeroshot_bad_inputs_are_one_line(export_dir, folder, tmp_path, capsys) -> None:
    base = ["zeroshot", "--model", str(export_dir), "--output", str(tmp_path / "o.json")]
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(capsys, *base, "--data", str(tmp_path / "empty"), "--templates", "cifar10")
    assert rc == 2 and "no images found" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, *base, "--data", str(folder), "--classnames", "cifar10",
                      "--templates", "cifar10")  # fmt: skip
    assert rc == 2 and "has 10 names but" in err and "3 classes" in err
    (tmp_path / "t.txt").write_text("a photo\n")
    rc, _, err = _run(capsys, *base, "--data", str(folder), "--templates", str(tmp_path / "t.txt"))
    assert rc == 2 and "t.txt entry 1" in err and "placeholder" in err
    rc, _, err = _run(capsys, *base, "--data", str(folder), "--templates", "cifar10",
                      "--batch-size", "0")  # fmt: skip
    assert rc == 2 and "--batch-size" in err


def test_unreadable_image_is_skipped_counted_reported(export_dir, folder, tmp_path, capsys):
    (folder / "red" / "broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "r.json"
    rc, _, err = _run(capsys, "zeroshot", "--model", str(export_dir), "--data", str(folder),
                      "--templates", "cifar10", "--output", str(out))  # fmt: skip
    r = json.loads(out.read_text())
    assert rc == 0 and r["skipped"] == 1 and r["n_samples"] == 12
    assert r["skipped_examples"][0].endswith("broken.png") and "skipped 1 unreadable" in err


def test_model_specs(micro_model, export_dir, tmp_path, folder, capsys) -> None:
    from safetensors.torch import save_file

    from clipkit.config.loader import to_yaml
    from clipkit.config.schema import Config

    # A training checkpoint folder: config.yaml + Accelerate's model.safetensors.
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    ckpt.mkdir(parents=True)
    cfg = Config()
    cfg.model.name = str(Path(__file__).with_name("micro_clip.json"))
    (ckpt / "config.yaml").write_text(to_yaml(cfg))
    save_file({k: v.contiguous() for k, v in micro_model.state_dict().items()},
              str(ckpt / "model.safetensors"))  # fmt: skip
    results = []
    for spec in (str(export_dir), str(ckpt)):
        out = tmp_path / "o.json"
        rc, _, err = _run(capsys, "zeroshot", "--model", spec, "--data", str(folder),
                          "--templates", "cifar10", "--output", str(out))  # fmt: skip
        assert rc == 0, err
        results.append(json.loads(out.read_text())["metrics"])
    assert results[0] == results[1]  # same weights, same numbers
    for argv, msg in (
        (["--model", str(tmp_path)], "not an export folder"),
        (["--model", "open_clip:ViT-B-32", "--pretrained", str(tmp_path / "w.pt")], "local"),
        (["--model", "open_clip:no-such-arch"], "unknown model name"),
    ):
        rc, _, err = _run(capsys, "zeroshot", *argv, "--data", str(folder),
                          "--output", str(tmp_path / "o.json"))  # fmt: skip
        assert rc == 2 and msg in err, err


def test_retrieval_cli_matches_library(micro_model, export_dir, data_root, tmp_path, capsys):
    out = tmp_path / "r.json"
    tsv = data_root / "coco_mini" / "captions.tsv"
    rc, stdout, err = _run(capsys, "retrieval", "--model", str(export_dir), "--data", str(tsv),
                           "--output", str(out), "--bootstrap", "20")  # fmt: skip
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["task"] == "zeroshot_retrieval" and r["dataset"] == "coco_mini"
    assert r["n_samples"] == 80 and r["n_captions"] == 400
    with torch.no_grad():
        ref = retrieval(micro_model, str(tsv), batch_size=64)
    for k, v in r["metrics"].items():
        assert v == pytest.approx(ref[k], abs=1e-6), k
    assert set(r["metrics_ci95"]) == set(r["metrics"])
    rc, _, err = _run(capsys, "retrieval", "--model", str(export_dir), "--data",
                      str(tmp_path / "none.tsv"), "--output", str(out))  # fmt: skip
    assert rc == 2 and "none.tsv" in err and "not found" in err
