"""Load a :class:`~clipkit.config.schema.Config` from YAML plus dotted ``key=value`` overrides.

OmegaConf structured configs do the type checking; this module turns their exceptions into one
line that names the key path, the bad value and the file, so a typo never trains silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from clipkit.config.schema import Config


class ConfigError(ValueError):
    """A configuration problem, with a one-line message fit to show a user."""


# Keys that moved to their task's section: an old config gets told where they went.
MOVED = {
    "model.pooling": "simcse.pooling",
    "model.mlp_train_only": "simcse.mlp_train_only",
    "model.max_length": "simcse.max_length",
    "data.mine_negatives": "simcse.mine_negatives",
    "data.mine_max_sim": "simcse.mine_max_sim",
}


def _describe(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        if key in MOVED:
            return f"{source}: config key '{key}' is now '{MOVED[key]}'"
        return f"{source}: unknown config key '{key}'"
    if isinstance(err, ValidationError):
        value = getattr(err, "value", None)
        msg = str(err).splitlines()[0]
        return f"{source}: bad value {value!r} for '{key}' ({msg})"
    return f"{source}: {str(err).splitlines()[0]} (key '{key}')"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the root config from defaults, an optional YAML file and CLI overrides.

    Args:
        path: YAML file whose keys mirror :class:`Config` (may hold a subset).
        overrides: dotted overrides such as ``["train.batch_size=256", "model.name=ViT-B-32"]``.

    Returns:
        A validated :class:`Config` instance.

    Raises:
        ConfigError: on a missing file, an unknown key or a value of the wrong type; the
            message is one line naming the path, key or value.

    Example:
        >>> cfg = load_config(None, ["train.batch_size=32"])
        >>> cfg.train.batch_size
        32
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = OmegaConf.load(p)
        except Exception as err:  # YAML syntax errors come in many types
            raise ConfigError(f"{p}: cannot parse YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        cfg = _merge(cfg, loaded, str(p))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, _, value = item.partition("=")
        if value == "":
            value = "''"  # `key=` means the empty string (e.g. data.builtin=), not null
        try:
            dotlist = OmegaConf.from_dotlist([f"{key}={value}"])
        except OmegaConfBaseException as err:
            raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from None
        cfg = _merge(cfg, dotlist, f"override '{item}'")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


def to_yaml(cfg: Config) -> str:
    """Serialise a config (e.g. into a checkpoint folder) so a run can be reproduced."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def split_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``[--config FILE] key=value ...`` into the YAML path and the overrides."""
    path: str | None = None
    overrides: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a file path")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option '{arg}'; use key=value overrides (train.epochs=2)")
        else:
            overrides.append(arg)
    return path, overrides
