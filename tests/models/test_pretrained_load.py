"""``model.pretrained``: weights files, export / run / checkpoint folders and open_clip tags, all
from local files; identical weights after loading; one-line refusals (issue 16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipkit.config.schema import ModelConfig
from clipkit.models import build_dual_encoder
from clipkit.models.pretrained import resolve_pretrained

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture
def arch(tmp_path: Path) -> Path:
    p = tmp_path / "tiny-pre.json"
    p.write_text(json.dumps(TINY))
    return p


@pytest.fixture
def source(arch: Path, tmp_path: Path):
    """A model (seed 1) and its export folder."""
    torch.manual_seed(1)
    m = build_dual_encoder(ModelConfig(name=str(arch)))
    with torch.no_grad():
        m.clip.logit_scale.fill_(2.5)  # not the init value, so loading it is visible
    return m, m.export(tmp_path / "run" / "export")


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _spec(kind: str, export: Path, src: torch.nn.Module, tmp: Path) -> str:
    state = {k: v.contiguous() for k, v in src.clip.state_dict().items()}
    if kind == "export":
        return str(export)
    if kind == "run":
        return str(export.parent)
    if kind == "safetensors":
        return str(export / "open_clip_model.safetensors")
    if kind == "pt-ddp":  # open_clip_train's epoch_N.pt: {"state_dict": {"module." + key}}
        torch.save(
            {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp / "e.pt"
        )
        return str(tmp / "e.pt")
    if kind == "bin":
        torch.save(state, tmp / "open_clip_pytorch_model.bin")
        return str(tmp / "open_clip_pytorch_model.bin")
    assert kind == "checkpoint"  # clipkit's checkpoint: the DualEncoder's state ("clip." keys)
    ck = tmp / "checkpoints" / "step_0000002"
    ck.mkdir(parents=True)
    (ck / "config.yaml").write_text("task: clip\n")
    save_file({f"clip.{k}": v for k, v in state.items()}, str(ck / "model.safetensors"))
    return str(ck)


@pytest.mark.parametrize("kind", ["export", "run", "safetensors", "pt-ddp", "bin", "checkpoint"])
def test_pretrained_gives_identical_weights(kind, arch, source, tmp_path) -> None:
    src, export = source
    spec = _spec(kind, export, src, tmp_path)
    torch.manual_seed(7)  # a different random init underneath
    m = build_dual_encoder(ModelConfig(name=str(arch), pretrained=spec))
    _assert_same(m.clip, src.clip)
    assert m.logit_scale.item() == 2.5


def test_mismatched_architecture_names_keys(arch, source, tmp_path) -> None:
    _, export = source
    wider = json.loads(arch.read_text())
    wider["vision_cfg"]["layers"] = 3  # one more block: keys the file does not have
    other = tmp_path / "tiny-deeper.json"
    other.write_text(json.dumps(wider))
    with pytest.raises(ValueError) as err:
        build_dual_encoder(ModelConfig(name=str(other), pretrained=str(export)))
    msg = str(err.value)
    assert "\n" not in msg and "does not fit the architecture" in msg
    assert "missing keys visual.transformer.resblocks.2." in msg and "more)" in msg
    wider = json.loads(arch.read_text())
    wider["embed_dim"] = 16  # same keys, other shapes
    other.write_text(json.dumps(wider))
    with pytest.raises(ValueError, match=r"other shapes .*\(32, 32\) vs \(32, 16\)") as err:
        build_dual_encoder(ModelConfig(name=str(other), pretrained=str(export)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nothing/here.pt", "model.pretrained file not found: nothing/here.pt"),
        ("no_such_tag", "not an open_clip tag of model.name="),
    ],
)
def test_bad_specs_are_one_line(spec, needle, arch) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        build_dual_encoder(ModelConfig(name=str(arch), pretrained=spec))
    assert "\n" not in str(err.value)


def test_folder_without_weights_and_non_weights_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="a folder without weights"):
        resolve_pretrained(str(tmp_path), "ViT-B-32")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a weights file"):
        resolve_pretrained(str(tmp_path / "notes.txt"), "ViT-B-32")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"cannot read .*bad.safetensors") as err:
        build_dual_encoder(
            ModelConfig(name="ViT-B-32", pretrained=str(tmp_path / "bad.safetensors"))
        )
    assert "\n" not in str(err.value)


def _empty_caches(monkeypatch, tmp_path: Path) -> Path:
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return hub


def test_tag_not_cached_names_tag_and_places(monkeypatch, tmp_path) -> None:
    hub = _empty_caches(monkeypatch, tmp_path)
    with pytest.raises(ValueError) as err:
        resolve_pretrained("openai", "ViT-B-32")
    msg = str(err.value)
    assert "\n" not in msg and "'openai' are not on this machine" in msg
    assert str(hub / "models--timm--vit_base_patch32_clip_224.openai") in msg
    assert str(tmp_path / "home" / ".cache" / "clip" / "ViT-B-32.pt") in msg


def test_tag_found_in_local_caches(monkeypatch, tmp_path) -> None:
    """A tag resolves to the file open_clip's downloader leaves in the HF cache (the .safetensors
    twin first) or in ~/.cache/clip, with the tag's preprocessing and QuickGELU flag."""
    hub = _empty_caches(monkeypatch, tmp_path)
    snap = hub / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    got = resolve_pretrained("laion2b_s34b_b79k", "ViT-B-32")
    assert got.path == snap / "open_clip_pytorch_model.bin"
    (snap / "open_clip_pytorch_model.safetensors").write_bytes(b"x")
    assert resolve_pretrained("laion2b_s34b_b79k", "ViT-B-32").path.name.endswith(".safetensors")
    assert got.tag_cfg["interpolation"] == "bicubic"
    url_cache = tmp_path / "home" / ".cache" / "clip"
    url_cache.mkdir(parents=True)
    (url_cache / "ViT-B-32.pt").write_bytes(b"x")
    openai = resolve_pretrained("openai", "ViT-B-32")
    assert openai.path == url_cache / "ViT-B-32.pt" and openai.tag_cfg["quick_gelu"] is True


def test_training_cli_refuses_in_one_line(arch, source, tmp_path) -> None:
    """Through the trainer's command line: one line naming the keys, exit 2, no run folder."""
    _, export = source
    out = tmp_path / "ft"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "model.name=clipkit-tiny",
         f"model.pretrained={export}", f"train.output_dir={out}", "train.trackers=[]"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit the architecture" in lines[0], res.stderr
    assert "missing keys" in lines[0] and "other shapes" in lines[0]
    assert not [p for p in out.rglob("*") if p.is_file()]  # nothing written


def test_checkpoint_of_a_finetune_loads_without_its_pretrained_file(arch, source, tmp_path):
    """A fine-tuned run's checkpoint rebuilds from config.yaml without re-reading
    model.pretrained (it may have moved): the checkpoint's weights are the model."""
    from clipkit.models.load import load_model

    src, _ = source
    ck = tmp_path / "ft" / "checkpoints" / "step_0000001"
    ck.mkdir(parents=True)
    (ck / "config.yaml").write_text(
        f"task: clip\nmodel:\n  name: {arch}\n  pretrained: {tmp_path / 'gone.safetensors'}\n"
    )
    state = {f"clip.{k}": v.contiguous() for k, v in src.clip.state_dict().items()}
    save_file(state, str(ck / "model.safetensors"))
    model, _ = load_model(str(ck))
    _assert_same(model.clip, src.clip)
