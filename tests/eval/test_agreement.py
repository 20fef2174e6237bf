"""Agreement with the peer tool: clipkit's evaluators vs the ``clip-benchmark`` package.

Same open_clip model, same data, CLIP_benchmark run in fp32 (``amp=False``): zero-shot top-1,
top-5 and mean per-class recall on a fixed 1,000-image subset of CIFAR-10 test (100 per class),
and retrieval recall@1/5/10 on ``coco_mini``, must agree within 1e-6. clipkit reads the data
with its own readers (the CIFAR tar in place, the COCO caption TSV); the peer reads an extracted
ImageFolder copy with torchvision and the COCO JSON.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from clipkit.eval import load_classnames, load_templates, retrieval, zero_shot
from clipkit.eval.datasets import labelled_loader, open_labelled

zsc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zsr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
PER_CLASS = 100


def _peer_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """Top-k accuracy as CLIP_benchmark 1.6.2 defines it, with ``.item()`` for the sum.

    Workaround: its ``accuracy`` calls ``float()`` on a 1-element numpy array, which numpy >= 2.4
    rejects; this replaces only that conversion (same topk/eq/sum, same division by n).
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()  # (k, N)
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run folder from 10 steps of clipkit's own training loop on the built-in digits."""
    from clipkit.train.cli import main

    tmp = tmp_path_factory.mktemp("trained")
    argv = [f"data.cache_dir={tmp / 'cache'}", f"train.output_dir={tmp / 'run'}",
            "train.max_steps=10", "train.batch_size=64", "train.trackers=[]",
            "train.torch_threads=1", "optim.warmup_steps=2", "optim.lr=1e-3"]  # fmt: skip
    assert main(argv) == 0
    return tmp / "run"


@pytest.fixture(params=["random", "export", pytest.param("trained", marks=pytest.mark.slow)])
def models(request, micro_model, tmp_path_factory):
    """(clipkit model, peer open_clip model, peer tokenizer, peer transform).

    random: fixed-seed random weights, one module for both tools; export: the same weights
    through clipkit's export, loaded by each tool on its own; trained: the export of a model
    trained by clipkit (``--model RUN_DIR`` resolves to ``RUN_DIR/export``).
    """
    if request.param == "random":
        return micro_model, micro_model.clip, micro_model.tokenizer, micro_model.preprocess_eval
    import open_clip

    from clipkit.eval.driver import load_model

    if request.param == "export":
        run = out = tmp_path_factory.mktemp("export")
        micro_model.export(out)
    else:
        run = request.getfixturevalue("trained_run")
        out = run / "export"
    peer, _, peer_tf = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    return load_model(str(run)).eval(), peer.eval(), tok, peer_tf


def _cifar_subset(data_root: Path, transform):
    ls = open_labelled(str(data_root / "cifar10" / "test.tar"), transform)
    labels = [r.label for r in ls.dataset.records]
    idx = [i for i in range(len(labels)) if i - labels.index(labels[i]) < PER_CLASS]
    return ls, idx


def test_zeroshot_agrees_with_clip_benchmark(models, data_root, tmp_path, monkeypatch) -> None:
    model, peer, tokenizer, peer_tf = models
    ls, idx = _cifar_subset(data_root, model.preprocess_eval)
    assert len(idx) == 10 * PER_CLASS
    classnames, templates = load_classnames("cifar10"), load_templates("cifar10")
    names = [ls.dataset.records[i].image.name for i in idx]
    ls.dataset = Subset(ls.dataset, idx)
    ours = zero_shot(model, labelled_loader(ls, batch_size=64), classnames, templates)

    with tarfile.open(data_root / "cifar10" / "test.tar") as tf:
        for name in names:
            tf.extract(tf.getmember("./" + name), tmp_path / "img", filter="data")
    from torchvision.datasets import ImageFolder

    peer_ds = ImageFolder(str(tmp_path / "img"), transform=peer_tf)
    assert peer_ds.classes == ls.classes == classnames
    monkeypatch.setattr(zsc, "accuracy", _peer_accuracy)
    ref = zsc.evaluate(
        peer, DataLoader(peer_ds, batch_size=64), tokenizer, classnames,
        [t.replace("{}", "{c}") for t in templates], "cpu", amp=False,
    )  # fmt: skip
    assert ours["n"] == 1000
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(ours[key] - ref[key]) <= 1e-6, (key, ours[key], ref[key])


def _peer_collate(batch):
    # What CLIP_benchmark's image_captions_collate_fn does (importing its builder module needs
    # `requests`, which nothing else here uses): stack images, keep caption lists as they are.
    images, captions = zip(*batch)
    return torch.stack(images), captions


class _PeerCoco(Dataset):
    """COCO captions JSON -> (image, [captions]), as CLIP_benchmark's retrieval datasets yield."""

    def __init__(self, root: Path, transform) -> None:
        d = json.loads((root / "annotations" / "captions_train2017.json").read_text())
        caps: dict[int, list[str]] = {}
        for a in d["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        self.items = [(root / "train2017" / im["file_name"], caps[im["id"]]) for im in d["images"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, caps = self.items[i]
        return self.transform(Image.open(path).convert("RGB")), caps


def test_retrieval_agrees_with_clip_benchmark(models, data_root) -> None:
    model, peer, tokenizer, peer_tf = models
    coco = data_root / "coco_mini"
    ours = retrieval(model, str(coco / "captions.tsv"), batch_size=32)
    loader = DataLoader(_PeerCoco(coco, peer_tf), batch_size=32, collate_fn=_peer_collate)
    ref = zsr.evaluate(peer, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert ours["n_images"] == 80 and ours["n_captions"] == 400
    for key, value in ref.items():
        assert abs(ours[key] - value) <= 1e-6, (key, ours[key], value)
