"""Fixtures for the evaluator tests: a tiny real model and a fast stand-in with known outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_fakes import KeyedTextModel


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on the shared 2-core machine (load ~12) a 64-image batch of the micro
    model took 0.016 s with 1 thread and 0.37 s with 2 (OpenMP threads waiting on each other)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


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


@pytest.fixture(scope="session")
def micro_model():
    """A 32 px, 64-d open_clip ViT (tests/eval/micro_clip.json) with fixed-seed random weights:
    CIFAR's native size, cheap enough to run 1,000 images through two tools on 2 busy cores."""
    from clipkit.config.schema import ModelConfig
    from clipkit.models import build_dual_encoder

    torch.manual_seed(0)
    cfg = ModelConfig(name=str(Path(__file__).with_name("micro_clip.json")))
    return build_dual_encoder(cfg).eval()
