"""Worker for test_fsdp_cpu.py: FSDP2 vs DDP on 2 gloo CPU processes, sharded checkpoints.

Run with ``torchrun --nproc_per_node 2 tests/train/fsdp_worker.py OUT_DIR``. The tiny dual
encoder of dist_worker.py in float64 takes 3 AdamW steps of one fixed global batch (each rank
its contiguous half) twice: wrapped by DDP, and sharded by FSDP2 (``fully_shard`` per tower, then
the root: the layout Accelerate's FSDP2 plugin builds). The clipkit loss module gathers across
ranks as in training. Rank 0 saves both runs' full parameters and open_clip exports.

Sharded checkpoints: the FSDP run saves model + optimizer with torch.distributed.checkpoint
(each rank writes its shards) after step 2; a fresh FSDP model from another seed loads it and
takes step 3; its parameters must equal the uninterrupted run's.

Accelerate is not in the FSDP path: Accelerate 1.15 turns an ``fsdp_plugin`` into FSDP only on
an accelerator; with ``cpu=True`` it stays MULTI_CPU and ``prepare`` wraps the model in DDP (the
worker records what it did; test_fsdp_cpu.py checks it). Its process group is the one used.
"""

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from clipkit.config.schema import LossConfig, ModelConfig
from clipkit.losses import build_loss
from clipkit.models import build_dual_encoder

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
GLOBAL, STEPS = 16, 3


def build(seed: int) -> torch.nn.Module:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tiny.json"
        path.write_text(json.dumps(copy.deepcopy(TINY)))
        torch.manual_seed(seed)
        return build_dual_encoder(ModelConfig(name=str(path)), LossConfig()).double()


def batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out, n = [], GLOBAL // world
    for _ in range(STEPS):
        images = torch.randn(GLOBAL, 3, 16, 16, generator=g, dtype=torch.float64)  # (N, 3, S, S)
        texts = torch.randint(1, 49000, (GLOBAL, 8), generator=g)  # (N, L)
        out.append((images[rank * n : (rank + 1) * n], texts[rank * n : (rank + 1) * n]))
    return out


def step(model, loss_fn, opt, batch) -> None:
    o = model(image=batch[0], text=batch[1])
    loss = loss_fn(o["image"], o["text"], logit_scale=o["logit_scale"])
    loss.backward()
    # FSDP2 leaves its ignored (scalar) parameters alone: average their gradients as DDP does.
    for p in getattr(model, "_unsharded", ()):
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
    opt.step()
    opt.zero_grad(set_to_none=True)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    # fully_shard refuses 0-d parameters ("fully_shard doesn't support scalar parameters.
    # Change logit_scale to a 1D tensor with numel equal to 1."): open_clip's logit_scale
    # (and SigLIP's logit_bias) stay replicated, outside the shards.
    scalars = {p for p in model.parameters() if p.dim() == 0}
    fully_shard(model.clip.visual)
    fully_shard(model.clip.transformer)
    fully_shard(model, ignored_params=scalars)
    model._unsharded = sorted(scalars, key=id)
    return model


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def main(out: str) -> None:
    torch.set_num_threads(1)
    # What Accelerate makes of an FSDP2 plugin on CPU (it forms the gloo group used below).
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    accelerate_says = (str(acc.distributed_type), type(acc.prepare(build(0))).__name__)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(rank, world)
    loss_cfg = LossConfig(name="infonce")

    # DDP: the reference.
    init = {k: v.detach().clone() for k, v in build(0).state_dict().items()}
    ddp = DistributedDataParallel(build(0))
    loss_fn = build_loss(loss_cfg).double()
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    for b in data:
        step(ddp, loss_fn, opt, b)
    ddp_params = {k: v.detach().clone() for k, v in ddp.module.state_dict().items()}

    # FSDP2, checkpointed (sharded, torch.distributed.checkpoint) after step 2.
    fsdp = shard(build(0))
    opt = torch.optim.AdamW(fsdp.parameters(), lr=1e-3)
    ckpt = str(Path(out) / "dcp_step2")
    for i, b in enumerate(data):
        step(fsdp, loss_fn, opt, b)
        if i == 1:
            msd, osd = get_state_dict(fsdp, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    fsdp_params = full_params(fsdp)

    # Resume: a fresh model (another seed), the sharded checkpoint, step 3.
    resumed = shard(build(7))
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    opt2.zero_grad()
    msd, osd = get_state_dict(resumed, opt2)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    step(resumed, loss_fn, opt2, data[2])
    resumed_params = full_params(resumed)
    shards = sorted(p.name for p in Path(ckpt).iterdir())

    if rank == 0:
        # Exports: the DDP module's, and an unsharded model holding the FSDP run's parameters.
        ddp.module.export(Path(out) / "export_ddp")
        plain = build(3)
        plain.load_state_dict(fsdp_params)
        plain.export(Path(out) / "export_fsdp")
        torch.save(
            {
                "init": init,
                "ddp": ddp_params,
                "fsdp": fsdp_params,
                "resumed": resumed_params,
                "files": shards,
                "accelerate": accelerate_says,
            },
            Path(out) / "params.pt",
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
