"""Worker for test_distributed.py: one step's gradients under N processes (gloo, CPU).

Run with ``torchrun --nproc_per_node N tests/train/dist_worker.py OUT.pt``. For each loss and
accumulation count, every rank holds a contiguous slice of one fixed global batch; rank 0 saves
the gradients that DDP leaves after its all-reduce, for comparison with one process holding the
whole batch. One launch covers every case (process start-up dominates on 2 cores).
"""

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from clipkit.config.schema import LossConfig, ModelConfig
from clipkit.losses import build_loss
from clipkit.models import build_dual_encoder
from clipkit.train.step import step_gradients

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
GLOBAL = 64


def one_case(acc: Accelerator, accum: int, loss_name: str) -> dict:
    rank, world = acc.process_index, acc.num_processes
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tiny.json"
        path.write_text(json.dumps(copy.deepcopy(TINY)))
        torch.manual_seed(0)
        lcfg = LossConfig(name=loss_name)
        # float64 so that the comparison with one process is exact up to summation order
        # (fp32 element-wise tolerances tripped on small entries on some machines).
        model = build_dual_encoder(ModelConfig(name=str(path)), lcfg).double()
    loss_fn = build_loss(lcfg).double()
    model = acc.prepare(model)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL, 3, 16, 16, generator=g, dtype=torch.float64)
    texts = torch.randint(1, 49000, (GLOBAL, 8), generator=g)
    local = GLOBAL // world
    sl = slice(rank * local, (rank + 1) * local)
    micro_size = local // accum
    micro = [
        {
            "image": images[sl][i * micro_size : (i + 1) * micro_size],
            "text": texts[sl][i * micro_size : (i + 1) * micro_size],
        }
        for i in range(accum)
    ]

    def embed(mb):
        o = model(image=mb["image"], text=mb["text"])
        return {
            "q": o["image"],
            "k": o["text"],
            "logit_scale": o["logit_scale"],
            "logit_bias": o.get("logit_bias"),
        }

    def compute_loss(e):
        return loss_fn(e["q"], e["k"], logit_scale=e["logit_scale"], logit_bias=e.get("logit_bias"))

    loss, finite = step_gradients(micro, embed, compute_loss, acc, model)
    assert finite
    grads = {
        n: p.grad.detach().clone()
        for n, p in acc.unwrap_model(model).named_parameters()
        if p.grad is not None
    }
    return grads


def main(out: str) -> None:
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    results = {}
    for loss_name in ("infonce", "siglip"):
        for accum in (1, 2):
            results[f"{loss_name}/{accum}"] = one_case(acc, accum, loss_name)
    if acc.is_main_process:
        torch.save(results, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
