"""configs/finetune_cifar10.yaml shrunk to a CPU smoke run: it starts from model.pretrained's
weights (bit for bit: at lr 0 the export is the start) and trains on class-name caption shards
(issue 16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipkit.config.schema import ModelConfig
from clipkit.models import build_dual_encoder
from clipkit.models.dual_encoder import EXPORT_WEIGHTS
from tests.cifar_cuts import cut_imagefolder_tar

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "finetune_cifar10.yaml"


@pytest.fixture(scope="module")
def setup(data_root: Path, tmp_path_factory) -> dict[str, Path | str]:
    """A random clipkit-cifar export (the 'zero-shot' start), caption shards of 3 classes x 8
    images built by data_tools.build_shards, and a test cut of those classes."""
    from data_tools.build_shards import main as build_shards

    d = tmp_path_factory.mktemp("finetune")
    classes = {"airplane", "cat", "ship"}
    src = cut_imagefolder_tar(data_root / "cifar10" / "test.tar", d / "part.tar", 8, classes)
    assert build_shards([str(src), str(d / "shards"), "--shard-size", "12", "--workers", "1"]) == 0
    torch.manual_seed(0)
    start = build_dual_encoder(ModelConfig(name="clipkit-cifar")).export(d / "start")
    return {
        "dir": d,
        "start": start,
        "shards": str(d / "shards" / "{00000..00001}.tar"),
        "test": src,
    }


def _finetune(setup: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(CONFIG),
        f"data.train={setup['shards']}", f"model.pretrained={setup['start']}",
        f"eval.zeroshot={setup['test']}", "eval.classnames=", "eval.batch_size=24",
        "train.max_steps=2", "train.batch_size=8", "data.workers=0", "train.trackers=[]",
        f"train.output_dir={out}", *extra,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_finetune_starts_from_pretrained_bitwise(setup) -> None:
    out = setup["dir"] / "lr0"
    _finetune(setup, out, "optim.lr=0", "eval.zeroshot=")
    got = load_file(str(out / "export" / EXPORT_WEIGHTS))
    want = load_file(str(Path(setup["start"]) / EXPORT_WEIGHTS))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)), k


def test_finetune_config_smoke(setup) -> None:
    out = setup["dir"] / "ft"
    _finetune(setup, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["eval/zeroshot/part/n"] == 24, metrics
    got = load_file(str(out / "export" / EXPORT_WEIGHTS))
    want = load_file(str(Path(setup["start"]) / EXPORT_WEIGHTS))
    moved = [k for k in want if not torch.equal(got[k], want[k])]
    assert "visual.proj" in moved and "text_projection" in moved  # it trained
    cfg = (out / "config.yaml").read_text()
    assert f"pretrained: {setup['start']}" in cfg
