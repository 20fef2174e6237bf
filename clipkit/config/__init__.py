"""Typed configuration loaded from YAML with dotted overrides."""

from clipkit.config.loader import ConfigError, load_config, split_cli, to_yaml
from clipkit.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SimCSEConfig,
    SSLConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SimCSEConfig",
    "SSLConfig",
    "TrainConfig",
    "load_config",
    "split_cli",
    "to_yaml",
]
