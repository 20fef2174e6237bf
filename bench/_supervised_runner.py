"""The supervised baseline of ``bench/ssl_train.py``: cross-entropy on CIFAR-10's labels.

Same backbone (torchvision ResNet-18 with the CIFAR stem, ``_lightly_ssl_runner.resnet18_cifar``),
optimiser, schedule, batch, steps, seed, loader and timing log as the lightly runner, so its
samples/s and kNN sit beside the self-supervised runs; a linear classifier ``512 -> classes`` on
the pooled features, one augmented view per image with the SimCLR recipe's geometry only
(random resized crop scale 0.08-1 at 32 px, horizontal flip p 0.5; no colour ops), ImageNet
normalisation. No lightly code: the baseline has no lightly side. kNN reads the backbone, as for
the SSL runs (the classifier is dropped).

    python bench/_supervised_runner.py --train ../shared/data/cifar10/train.tar --steps 3 \
        --batch 32 --lr 0.015 --out /tmp/supervised

Writes what the lightly runner writes (``metrics.jsonl``, ``backbone.pt``,
``backbone_step<N>.pt``).
"""

from __future__ import annotations

import argparse

import torch
from _lightly_ssl_runner import TarImages, common_args, resnet18_cifar, run_loop
from torch import nn


def main(argv: list[str] | None = None) -> int:
    import torchvision.transforms as T

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_args(p)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    transform = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.08, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    data = TarImages(args.train, transform)
    classes = 1 + max(rec.label for rec in data.items)
    backbone = resnet18_cifar()
    classifier = nn.Linear(512, classes)
    criterion = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, labels: torch.Tensor, i: int) -> torch.Tensor:
        return criterion(classifier(backbone(x)), labels)  # logits (B, classes)

    return run_loop(args, data, (backbone, classifier), step)


if __name__ == "__main__":
    raise SystemExit(main())
