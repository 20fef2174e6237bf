"""Fixtures for the embedding tests: a tiny random-weight model exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipkit.config.schema import ModelConfig
from clipkit.models import build_dual_encoder


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip-format export of ``clipkit-tiny`` with fixed random weights."""
    torch.manual_seed(0)
    model = build_dual_encoder(ModelConfig(name="clipkit-tiny"))
    return model.export(tmp_path_factory.mktemp("tiny") / "export")


@pytest.fixture(scope="session")
def embedder(tiny_export: Path):
    from clipkit.embed import Embedder

    return Embedder.load(tiny_export)
