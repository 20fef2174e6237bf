"""SSLModel: backbones by name, the papers' heads, export and load, one-line errors."""

import pytest
import torch

from clipkit.models.load import load_model
from clipkit.models.ssl import HEADS, SSLModel, build_backbone, load_ssl_model


def test_cifar_stem_keeps_resolution_and_drops_the_classifier():
    net, dim = build_backbone("resnet18", cifar_stem=True)
    assert dim == 512 and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_heads_give_unit_projections(head):
    torch.manual_seed(0)
    k = 10 if head == "swav" else 0
    m = SSLModel("resnet18", head, proj_hidden=64, proj_dim=16, prototypes=k).eval()
    x = torch.randn(3, 3, 32, 32)
    z = m(x)
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    assert m.encode_image(x).shape == (3, 512)
    assert (m.predictor is not None) == (head in ("moco_v3", "byol"))
    raw = m(x, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), z)
    if head == "swav":
        # Scores are cosines to unit-norm prototypes: |s| <= 1, and they equal z @ W^T.
        s = m(x, scores=True)  # (3, K)
        assert s.shape == (3, k)
        torch.testing.assert_close(m.prototypes.weight.norm(dim=-1), torch.ones(k))
        torch.testing.assert_close(s, z @ m.prototypes.weight.T)


def test_swav_prototypes_are_renormalised_and_exported(tmp_path):
    from clipkit.models.ssl import load_ssl_model

    m = SSLModel("timm:resnet10t", "swav", 32, 8, prototypes=6)
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    m.normalize_prototypes_()
    torch.testing.assert_close(m.prototypes.weight.norm(dim=-1), torch.ones(6))
    back = load_ssl_model(m.export(tmp_path / "swav"))
    assert back.prototypes.weight.shape == (6, 8)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back.eval()(x, scores=True), m.eval()(x, scores=True))


def test_timm_and_open_clip_backbones():
    assert SSLModel("timm:resnet10t", "simclr", 32, 8)(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    m = SSLModel("open_clip:clipkit-tiny", "simclr", 32, 8, image_size=64)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 8)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"backbone": "vgg11"}, "unknown ssl.backbone 'vgg11'"),
        ({"head": "dino"}, "unknown ssl.head 'dino'"),
        ({"head": "swav"}, "the swav head needs prototypes >= 1"),
        ({"head": "simclr", "prototypes": 5}, "other heads none"),
        ({"backbone": "timm:no_such_net"}, "ssl.backbone=timm:no_such_net"),
        ({"backbone": "open_clip:clipkit-tiny", "image_size": 32}, "takes 64 px"),
    ],
)
def test_bad_names_are_one_line(kwargs, needle):
    with pytest.raises(ValueError) as info:
        SSLModel(**kwargs)
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1


def test_export_loads_back_identically(tmp_path):
    torch.manual_seed(1)
    m = SSLModel("resnet18", "moco_v2", 64, 16).eval()
    m.export(tmp_path / "export")
    back = load_ssl_model(tmp_path / "export").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
    via, name = load_model(str(tmp_path / "export"))
    assert isinstance(via, SSLModel) and name == str(tmp_path / "export")
    with pytest.raises(ValueError, match="not an SSL export"):
        load_ssl_model(tmp_path)
