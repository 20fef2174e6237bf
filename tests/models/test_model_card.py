"""The model card every ``clipkit export`` folder carries: facts from the run, never guessed."""

from __future__ import annotations

import json
import shutil

from export_helpers import exported

from clipkit.config.loader import load_config, to_yaml
from clipkit.models import load_dual_encoder
from clipkit.models.model_card import find_run, render


def test_card_from_a_stopped_run_reads_metrics_jsonl(tmp_path_factory, tmp_path) -> None:
    """No metrics.json (the run stopped early): the last logged value of each key; a torn last
    line is skipped."""
    run = tmp_path / "myrun"
    shutil.copytree(exported(tmp_path_factory, "open_clip"), run / "export")
    cfg = load_config(
        overrides=["model.name=clipkit-tiny", "data.builtin=", "data.train=s/{0..3}.tar"]
    )
    (run / "config.yaml").write_text(to_yaml(cfg))
    lines = [
        {"step": 10, "train/loss": 3.5, "train/samples_seen": 640},
        {"step": 10, "eval/zeroshot/cifar10/acc1": 0.125, "eval/zeroshot/cifar10/n": 100.0},
        {"step": 20, "eval/zeroshot/cifar10/acc1": 0.25, "eval/zeroshot/cifar10/n": 100.0},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 30, "eval/zero'
    (run / "metrics.jsonl").write_text(text)
    model = load_dual_encoder(run / "export")
    assert find_run(str(run / "export")) == run
    card = render(model, str(run / "export"), "onnx", "clipkit export myrun --format onnx", ["a"])
    assert card.startswith("---\nlibrary_name: onnx\n") and "# myrun" in card
    assert "| `eval/zeroshot/cifar10/acc1` | 0.2500 |" in card
    assert "| `eval/zeroshot/cifar10/n` | 100 |" in card
    assert "| data | s/{0..3}.tar |" in card and "| steps | 20 |" in card
    assert "| image tower | ViT: 4 layers, width 256, patch 8, image 64 |" in card
    assert "clipkit export myrun --format onnx" in card


def test_card_outside_a_run_says_unknown(tmp_path_factory) -> None:
    folder = exported(tmp_path_factory, "open_clip")
    model = load_dual_encoder(folder)
    card = render(model, str(folder), "hf", "clipkit export x --format hf", ["config.json"])
    assert "Not known:" in card and "No evaluation results were recorded" in card
    assert "| steps |" not in card
