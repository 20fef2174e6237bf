"""Fixtures for the evaluator tests: a tiny real model and a fast stand-in with known outputs."""

from __future__ import annotations

import pytest
import torch
from eval_fakes import KeyedTextModel


@pytest.fixture
def keyed_model() -> KeyedTextModel:
    return KeyedTextModel()


@pytest.fixture(scope="session")
def tiny_model():
    """clipkit-tiny (64 px ViT, 256-d) with fixed-seed random weights."""
    from clipkit.config.schema import ModelConfig
    from clipkit.models import build_dual_encoder

    torch.manual_seed(0)
    return build_dual_encoder(ModelConfig(name="clipkit-tiny")).eval()
