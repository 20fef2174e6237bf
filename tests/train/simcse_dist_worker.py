"""Worker for test_simcse_task.py: SimCSE first-step gradients under N gloo processes.

``torchrun --nproc_per_node N simcse_dist_worker.py OUT.pt MODEL_DIR DATA.csv GLOBAL ACCUM``:
the real task (model, rank-sharded data, embed) and loss; rank 0 saves the gradients DDP leaves.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from clipkit.config import load_config
from clipkit.losses import build_loss
from clipkit.train.simcse_task import SimCSETask
from clipkit.train.step import step_gradients


def main(out: str, model_dir: str, data: str, global_batch: int, accum: int) -> None:
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    w = acc.num_processes
    cfg = load_config(
        str(Path(__file__).resolve().parents[2] / "configs" / "simcse_sup.yaml"),
        [
            f"model.hf_text_model={model_dir}",
            f"data.train={data}",
            "simcse.max_length=16",
            f"train.batch_size={global_batch // w // accum}",
            f"train.accum_steps={accum}",
            "eval.sts=",
            f"train.output_dir={Path(out).parent / 'run'}",
        ],
    )
    task = SimCSETask()
    torch.manual_seed(0)
    model = task.build_model(cfg)
    loss_fn = build_loss(cfg.loss)
    batches = task.build_train_data(cfg, model, acc.process_index, w)
    batches.set_epoch(0)
    it = iter(batches)
    micro = [next(it) for _ in range(accum)]
    model = acc.prepare(model)
    model.train()

    def embed(mb):
        e = task.embed(model, mb)
        return {"q": e.q, "k": e.k, "hard_negatives": e.hard_negatives}

    def compute_loss(e):
        return loss_fn(e["q"], e["k"], hard_negatives=e["hard_negatives"])

    _, finite = step_gradients(micro, embed, compute_loss, acc, model)
    assert finite
    grads = {
        n: p.grad.detach().clone()
        for n, p in acc.unwrap_model(model).named_parameters()
        if p.grad is not None
    }
    if acc.process_index == 0:
        torch.save(grads, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
