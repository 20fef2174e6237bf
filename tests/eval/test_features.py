"""Feature extraction: unit rows in data order, a cache keyed by weights, data and transform."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cifar_cuts import cut_imagefolder_tar

from clipkit.eval.features import cache_key, extract_features


class EncodeOnly:
    """The least a model needs: ``encode_image`` and ``preprocess_eval`` (an SSL stand-in)."""

    def __init__(self) -> None:
        from torchvision import transforms

        self.preprocess_eval = transforms.Compose(
            [transforms.Resize(8), transforms.CenterCrop(8), transforms.ToTensor()]
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :24] * 3.0  # (B, 24), not unit-norm


@pytest.fixture(scope="module")
def small_tar(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cifar") / "test.tar"
    return cut_imagefolder_tar(data_root / "cifar10" / "test.tar", out, 3)


def test_unit_rows_in_data_order_any_encode_image_model(small_tar) -> None:
    f = extract_features(EncodeOnly(), str(small_tar), batch_size=7)
    assert f.feats.shape == (30, 24) and f.feats.dtype == torch.float32
    torch.testing.assert_close(f.feats.norm(dim=1), torch.ones(30))
    assert f.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert not f.cached


def test_cache_hit_equals_fresh_and_keys_follow_inputs(micro_model, small_tar, tmp_path) -> None:
    fresh = extract_features(micro_model, str(small_tar), batch_size=16, cache_dir=tmp_path)
    hit = extract_features(micro_model, str(small_tar), batch_size=5, cache_dir=tmp_path)
    assert hit.cached and not fresh.cached
    torch.testing.assert_close(hit.feats, fresh.feats, rtol=0, atol=0)
    assert torch.equal(hit.labels, fresh.labels)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    key = cache_key(micro_model, str(small_tar))
    assert cache_key(micro_model, str(small_tar), precision="bf16") != key
    # Another model (different weights) gets another key; so does an edited set.
    other = EncodeOnly()
    assert cache_key(other, str(small_tar)) != key
    st = small_tar.stat()
    os.utime(small_tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(micro_model, str(small_tar)) != key


def test_no_images_raises(tmp_path) -> None:
    with pytest.raises(ValueError, match="not found"):
        extract_features(EncodeOnly(), str(tmp_path / "missing.tar"))


def test_a_broken_cache_file_is_recomputed(small_tar, tmp_path) -> None:
    model = EncodeOnly()
    (tmp_path / f"{cache_key(model, str(small_tar))}.npz").write_bytes(b"PK\x03\x04 not a zip")
    f = extract_features(model, str(small_tar), cache_dir=tmp_path)
    assert not f.cached and f.feats.shape == (30, 24)
    assert extract_features(model, str(small_tar), cache_dir=tmp_path).cached  # rewritten
