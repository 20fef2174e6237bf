"""WiSE-FT (issue 16): exact endpoints, float64 midpoint, refusals, and the alpha sweep through
the one evaluation driver."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipkit.cli import main
from clipkit.config.schema import ModelConfig
from clipkit.models import build_dual_encoder
from clipkit.models.dual_encoder import EXPORT_WEIGHTS
from clipkit.models.wise_ft import interpolate_state

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _export(tmp: Path, name: str, seed: int, cfg: dict | None = None) -> Path:
    arch = tmp / f"{name}.json"
    arch.write_text(json.dumps(cfg or TINY))
    torch.manual_seed(seed)
    m = build_dual_encoder(ModelConfig(name=str(arch)))
    with torch.no_grad():
        # signed zeros and a subnormal: what a float formula at alpha 0 / 1 would not keep
        m.clip.visual.proj.view(-1)[:3] = torch.tensor([-0.0, 0.0, 1e-40])
        m.clip.logit_scale.fill_(1.0 + seed)
    return m.export(tmp / name)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return _export(tmp_path, "zs", 1), _export(tmp_path, "ft", 2)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / EXPORT_WEIGHTS))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def _wise(zs: Path, ft: Path, out: Path, *more: str) -> int:
    return main(
        ["wise-ft", "--zeroshot", str(zs), "--finetuned", str(ft), "--output", str(out), *more]
    )


@pytest.mark.parametrize("alpha", ["0", "1"])
def test_endpoints_reproduce_inputs_bitwise(alpha, pair, tmp_path) -> None:
    zs, ft = pair
    out = tmp_path / f"a{alpha}"
    assert _wise(zs, ft, out, "--alpha", alpha) == 0
    got, want = _weights(out), _weights(zs if alpha == "0" else ft)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(_bits(got[k]), _bits(want[k])), k
    # the config is the fine-tuned model's, and the folder loads like a run's export
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg == json.loads((ft / "open_clip_config.json").read_text())
    from clipkit.models.load import load_model

    m, name = load_model(str(out))
    assert name == str(out) and m.logit_scale.item() == (2.0 if alpha == "0" else 3.0)


def test_midpoint_is_float64_mean_within_fp32_rounding(pair, tmp_path) -> None:
    zs, ft = pair
    assert _wise(zs, ft, tmp_path / "mid", "--alpha", "0.5") == 0
    got, z, f = _weights(tmp_path / "mid"), _weights(zs), _weights(ft)
    for k in got:
        mean = (z[k].double() + f[k].double()) / 2
        # one rounding of the exact mean: at most half an fp32 ulp (2^-24 relative) away,
        # the smallest fp32 subnormal (2^-149) absolute near zero
        err = (got[k].double() - mean).abs()
        bound = mean.abs() * 2.0**-24 + 2.0**-149
        assert bool((err <= bound).all()), (k, float((err - bound).max()))
    assert got["logit_scale"].item() == 2.5


def test_interpolate_state_integer_buffers() -> None:
    z = {
        "w": torch.tensor([1.0]),
        "ids": torch.tensor([0, 1]),
        "bn.num_batches_tracked": torch.tensor(0),
    }
    f = {
        "w": torch.tensor([3.0]),
        "ids": torch.tensor([0, 1]),
        "bn.num_batches_tracked": torch.tensor(7),
    }
    out = interpolate_state(z, f, 0.25)
    assert out["w"].item() == 1.5 and torch.equal(out["ids"], z["ids"])
    assert out["bn.num_batches_tracked"].item() == 7  # a step counter: the fine-tuned one's
    with pytest.raises(ValueError, match="integer buffer ids differs"):
        interpolate_state(z, {**f, "ids": torch.tensor([0, 2])}, 0.5)


def _refused(capsys, code: int, out: Path, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize(
    ("alpha", "needle"), [("1.5", "got 1.5"), ("-0.1", "got -0.1"), ("nan", "got nan")]
)
def test_alpha_outside_unit_interval_is_refused(alpha, needle, pair, tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    _refused(
        capsys, _wise(*pair, out, "--alpha", alpha), out, f"--alpha must be in [0, 1] ({needle})"
    )


def test_other_architectures_are_refused(pair, tmp_path, capsys) -> None:
    zs, _ = pair
    deeper = json.loads(json.dumps(TINY))
    deeper["vision_cfg"]["layers"] = 3
    out = tmp_path / "bad"
    _refused(capsys, _wise(zs, _export(tmp_path, "deep", 3, deeper), out, "--alpha", "0.5"), out,
             "different architectures (vision_cfg.layers: 2 vs 3)")  # fmt: skip
    # same keys and shapes, other config: still two different networks
    heads = json.loads(json.dumps(TINY))
    heads["text_cfg"]["heads"] = 4
    _refused(capsys, _wise(zs, _export(tmp_path, "heads", 4, heads), out, "--alpha", "0.5"), out,
             "text_cfg.heads: 2 vs 4")  # fmt: skip


def test_weights_file_of_other_architecture_is_refused(pair, tmp_path, capsys) -> None:
    """--zeroshot as a bare weights file loads into the fine-tuned architecture, or is refused
    naming the keys."""
    zs, ft = pair
    deeper = json.loads(json.dumps(TINY))
    deeper["text_cfg"]["layers"] = 3
    other = _export(tmp_path, "deep", 3, deeper) / EXPORT_WEIGHTS
    out = tmp_path / "bad"
    _refused(capsys, _wise(other, ft, out, "--alpha", "0.5"), out,
             "unexpected keys transformer.resblocks.2.")  # fmt: skip
    assert _wise(zs / EXPORT_WEIGHTS, ft, tmp_path / "ok", "--alpha", "0") == 0
    got, want = _weights(tmp_path / "ok"), _weights(zs)
    assert all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)


def test_output_and_input_refusals(pair, tmp_path, capsys) -> None:
    zs, ft = pair
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert _wise(zs, ft, busy, "--alpha", "0.5") == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    out = tmp_path / "bad"
    _refused(capsys, _wise(tmp_path / "nowhere", ft, out, "--alpha", "0.5"), out, "--zeroshot")
    _refused(capsys, _wise(zs, tmp_path / "nowhere", out, "--alpha", "0.5"), out, "--finetuned:")
    _refused(
        capsys, _wise("open_clip:ViT-B-32", ft, out, "--alpha", "0.5"), out, "names no weights"
    )
    _refused(capsys, _wise(zs, ft, out, "--alphas", "0,2", "--eval", "x.tar"), out, "--alphas")
    _refused(capsys, _wise(zs, ft, out, "--alphas", "0,1"), out, "needs at least one --eval")
    _refused(capsys, _wise(zs, ft, out, "--alphas", "0,1", "--eval", str(tmp_path / "no.tar")), out,
             "no.tar")  # fmt: skip


def test_an_empty_output_folder_is_used(pair, tmp_path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert _wise(*pair, out, "--alpha", "0.25") == 0
    assert (out / EXPORT_WEIGHTS).is_file()


@pytest.fixture(scope="module")
def cuts(data_root: Path, tmp_path_factory) -> dict[str, Path]:
    """CIFAR-10 test cuts: 4 images per class of 3 classes, and of 2 others."""
    from tests.cifar_cuts import cut_imagefolder_tar

    d = tmp_path_factory.mktemp("wise_cuts")
    src = data_root / "cifar10" / "test.tar"
    return {
        "ft": cut_imagefolder_tar(src, d / "ft.tar", 4, {"airplane", "cat", "ship"}),
        "other": cut_imagefolder_tar(src, d / "other.tar", 4, {"dog", "truck"}),
    }


def test_sweep_through_the_driver(pair, cuts, tmp_path, capsys) -> None:
    """Table, JSON and plot; alpha 0 / 1 are exactly `clipkit eval zeroshot` on the inputs."""
    zs, ft = pair
    out = tmp_path / "sweep"
    code = _wise(
        zs, ft, out, "--alphas", "0,0.5,1", "--eval", f"seen={cuts['ft']}", "--eval",
        f"unseen={cuts['other']}", "--templates", "cifar10", "--workers", "0", "--save-models",
        "--no-progress",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "wise_ft.json").read_text())
    assert [p["alpha"] for p in res["points"]] == [0.0, 0.5, 1.0]
    assert res["points"][0]["n"] == {"seen": 12, "unseen": 8}
    table = (out / "wise_ft.md").read_text().splitlines()
    assert table[0] == "| alpha | seen acc1 | unseen acc1 |" and len(table) == 5
    assert (out / "wise_ft.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "alpha_0",
        "alpha_0.5",
        "alpha_1",
    ]
    for alpha, model in (("0", zs), ("1", ft)):
        for name in ("seen", "unseen"):
            one = tmp_path / f"zs_{alpha}_{name}.json"
            data = cuts["ft" if name == "seen" else "other"]
            argv = ["eval", "zeroshot", "--model", str(model), "--data", str(data)]
            argv += ["--templates", "cifar10", "--workers", "0", "--no-progress"]
            assert main([*argv, "--output", str(one)]) == 0
            want = json.loads(one.read_text())["metrics"]
            got = res["points"][int(alpha) * 2]["metrics"][name]
            assert all(math.isclose(got[k], want[k], abs_tol=1e-12) for k in want), (got, want)
