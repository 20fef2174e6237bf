from pathlib import Path

import pytest

from clipkit.config import Config, ConfigError, load_config, split_cli, to_yaml


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.batch_size=256", "model.name=ViT-B-32", "data.weights=[1,2]"])
    assert isinstance(cfg, Config)
    assert cfg.train.batch_size == 256
    assert cfg.model.name == "ViT-B-32"
    assert cfg.data.weights == [1.0, 2.0]


def test_yaml_then_override(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\n  batch_size: 8\nloss:\n  name: siglip\n")
    cfg = load_config(f, ["train.batch_size=16"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.loss.name) == (3, 16, "siglip")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.batch_sise=8", "train.batch_sise"),
        ("train.batch_size=abc", "'abc'"),
        ("nosuch.key=1", "nosuch"),
        ("loss.temperature=hot", "loss.temperature"),
        ("train.batch_size", "key=value"),
    ],
)
def test_bad_override_one_line(override: str, needle: str):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert needle in msg
    assert "\n" not in msg


def test_unknown_key_in_yaml(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(f)


def test_wrong_type_in_yaml(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_config(f)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


def test_shipped_configs_load():
    repo = Path(__file__).resolve().parents[2]
    files = sorted((repo / "configs").glob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        load_config(f)


def test_split_cli_and_yaml_roundtrip(tmp_path: Path):
    path, ov = split_cli(["--config", "x.yaml", "train.epochs=2"])
    assert path == "x.yaml" and ov == ["train.epochs=2"]
    with pytest.raises(ConfigError):
        split_cli(["--bogus"])
    cfg = load_config(None, ["train.epochs=7"])
    f = tmp_path / "r.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config(f) == cfg


def test_empty_override_is_empty_string():
    cfg = load_config(None, ["data.builtin=", "model.pretrained="])
    assert cfg.data.builtin == "" and cfg.model.pretrained == ""
