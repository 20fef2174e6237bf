"""Distributed evaluation: 2 gloo processes, uneven slices, every rank gets the global metrics."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from eval_fakes import KeyedTextModel
from test_zeroshot import CLASSES, TEMPLATES, _images_for

from clipkit.eval import retrieval, zero_shot


def _caption_set(model: KeyedTextModel, n: int):
    caps = [[f"photo {i}", f"picture {i}", f"image {i}"][: 1 + i % 3] for i in range(n)]
    g = torch.Generator().manual_seed(0)
    images = torch.stack([model.text_vector(c[0]) for c in caps])  # (n, D)
    return images + 0.3 * torch.randn(images.shape, generator=g), caps


def _worker(rank: int, world: int, port: int, labels: np.ndarray, q) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    model = KeyedTextModel()
    images = _images_for(model, labels, noise=0.35, seed=1)
    # Uneven split by rank: rank 0 gets 3 batches of 7, rank 1 the rest in batches of 5.
    mine = np.arange(len(labels))[:21] if rank == 0 else np.arange(len(labels))[21:]
    step = 7 if rank == 0 else 5
    batches = [
        (images[mine[i : i + step]], torch.as_tensor(labels[mine[i : i + step]]))
        for i in range(0, len(mine), step)
    ]
    split = zero_shot(model, batches, CLASSES, TEMPLATES, accelerator=acc)
    # A loader prepared by Accelerate pads the last batch; gather_for_metrics drops the copies.
    ds = torch.utils.data.TensorDataset(images, torch.as_tensor(labels))
    loader = acc.prepare(torch.utils.data.DataLoader(ds, batch_size=4))
    prepared = zero_shot(model, loader, CLASSES, TEMPLATES, accelerator=acc)
    # Retrieval: rank 0 holds images 0..12, rank 1 images 13..29 (caption counts vary).
    r_images, caps = _caption_set(model, 30)
    lo, hi = (0, 13) if rank == 0 else (13, 30)
    r_batches = [(r_images[i : min(i + 4, hi)], caps[i : min(i + 4, hi)]) for i in range(lo, hi, 4)]
    ret = retrieval(model, r_batches, accelerator=acc)
    # A rank without data (fewer shards than ranks) still joins the gathers.
    all_batches = [(r_images[i : i + 4], caps[i : i + 4]) for i in range(0, 30, 4)]
    lopsided = retrieval(model, all_batches if rank == 0 else [], accelerator=acc)
    q.put((rank, split, prepared, ret, lopsided))
    acc.wait_for_everyone()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(keyed_model) -> None:
    import torch.multiprocessing as mp

    labels = np.random.default_rng(0).integers(0, len(CLASSES), size=47)
    single = zero_shot(
        keyed_model, [(_images_for(keyed_model, labels, 0.35, 1), torch.as_tensor(labels))],
        CLASSES, TEMPLATES,
    )  # fmt: skip
    r_images, caps = _caption_set(keyed_model, 30)
    single_ret = retrieval(keyed_model, [(r_images, caps)])
    assert 0 < single_ret["image_retrieval_recall@1"] < 1
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, labels, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, split, prepared, ret, lopsided in results:
        assert split == pytest.approx(single, abs=1e-12)
        assert prepared == pytest.approx(single, abs=1e-12)
        assert ret == pytest.approx(single_ret, abs=1e-12)
        assert lopsided == pytest.approx(single_ret, abs=1e-12)
    assert single["n"] == 47 and single_ret["n_captions"] == 60
