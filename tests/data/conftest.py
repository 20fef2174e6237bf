"""Small shard sets made from the real COCO-mini photos (resized small to keep tests fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import coco_photos, write_shards


@pytest.fixture(scope="session")
def photos(data_root: Path) -> list[bytes]:
    return coco_photos(data_root, 96)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, photos) -> Path:
    """8 shards x 12 samples."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, photos, 12)
    return out
