"""``train(cfg)``: the one training loop, for every task, under HF Accelerate.

Reads top to bottom: setup -> model, data, loss, optimiser -> resume -> steps (exact GradCache
accumulation, clipping, non-finite guard, logging, checkpoints, evaluation) -> export.
Accelerate owns devices and distribution (CPU, DDP, FSDP through ``accelerate launch``); the
data is split by node and worker by the task's loader, so no two processes read the same shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from clipkit.config.loader import to_yaml
from clipkit.config.schema import Config
from clipkit.losses import build_loss
from clipkit.train.allocator import keep_freed_memory
from clipkit.train.checkpoint import (
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    sweep_stale_checkpoints,
)
from clipkit.train.fault import rank_failure_guard
from clipkit.train.gradcache import widen
from clipkit.train.optim import build_optimizer, lr_lambda
from clipkit.train.outputs import (
    as_write_error,
    check_fresh_start,
    check_output_dir,
    sweep_stale,
    truncate_jsonl,
    write_failed,
    write_text,
)
from clipkit.train.step import step_gradients
from clipkit.train.task import TrainData, get_task

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_nonfinite`` consecutive non-finite losses."""


def train(cfg: Config) -> dict[str, Any]:
    """Train per ``cfg``; returns the final metrics (also written to ``<output_dir>/metrics.json``).

    Raises:
        ValueError: bad configuration or data (one line naming the value).
        RankLostError: another process died or hung (a ValueError: one line naming the rank
            and the checkpoint to resume from; :mod:`clipkit.train.fault`).
        NonFiniteLossError: too many consecutive non-finite losses.
    """
    run_dir = Path(cfg.train.output_dir).expanduser().resolve()
    with rank_failure_guard(run_dir), keep_freed_memory(cfg.train.keep_freed_memory):
        return _train(cfg)


def _train(cfg: Config) -> dict[str, Any]:
    # ------------------------------------------------------------------ setup
    if cfg.train.precision not in PRECISIONS:
        raise ValueError(f"train.precision={cfg.train.precision!r}; valid: {', '.join(PRECISIONS)}")
    if cfg.train.accum_steps < 1 or cfg.train.batch_size < 1:
        raise ValueError("train.batch_size and train.accum_steps must be >= 1")
    if cfg.train.collective_timeout_s < 0:
        raise ValueError(f"train.collective_timeout_s={cfg.train.collective_timeout_s}: >= 0")
    if cfg.train.torch_threads > 0:
        torch.set_num_threads(cfg.train.torch_threads)
    run_dir = Path(cfg.train.output_dir).expanduser().resolve()
    check_output_dir(run_dir)  # an unwritable run folder fails now, not at the first checkpoint
    check_fresh_start(run_dir, cfg.train.resume)  # never append to an earlier run's logs
    # Under torchrun on a machine without CUDA, Accelerate only forms the gloo process group
    # when told it is a CPU run; otherwise every rank would silently train alone.
    cpu_multi = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A collective that waits longer than this for a peer fails (fault.py names the peer).
    timeout = timedelta(seconds=cfg.train.collective_timeout_s or 1800)
    accelerator = Accelerator(
        cpu=cpu_multi,
        mixed_precision=PRECISIONS[cfg.train.precision],
        log_with=list(cfg.train.trackers) or None,
        project_dir=str(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    main = accelerator.is_main_process
    if main:
        # What a killed or failed writer left (step_XXXXXXX.tmp, metrics.json.tmp, export.tmp)
        # holds the space this run is about to need (issue 17: a full disk).
        sweep_stale_checkpoints(run_dir)
        sweep_stale(run_dir, "*.tmp")
    if accelerator.device.type == "cuda" and cfg.train.tf32:
        # As open_clip does: TF32 for the fp32 matmuls left under autocast, tuned cuDNN kernels.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    set_seed(cfg.train.seed, device_specific=False)
    task = get_task(cfg.task)

    # ----------------------------------------------- model, data, loss, optimiser
    model = task.build_model(cfg)
    # Evaluation inputs are checked now: a typo in eval.* costs seconds, not a training run.
    task.check_inputs(cfg, model)
    loss_fn = build_loss(cfg.loss)
    data = task.build_train_data(cfg, model, accelerator.process_index, accelerator.num_processes)
    if not isinstance(data, TrainData):
        raise TypeError(
            f"task '{cfg.task}': build_train_data returned {type(data).__name__}, "
            "which does not follow clipkit.train.task.TrainData"
        )
    accum = cfg.train.accum_steps
    steps_per_epoch = data.num_batches // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} x accum_steps={accum} x "
            f"{accelerator.num_processes} processes is larger than the data "
            f"({data.num_batches} micro-batches per process per epoch)"
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    optimizer = build_optimizer([model, loss_fn], cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    if cfg.model.compile:
        # The towers only: the tiled loss stays out of the graph (it is compiler-disabled).
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = loss_fn.to(accelerator.device)
    # The scheduler is stepped once per optimiser step on every rank (not prepared: Accelerate
    # would step it num_processes times, assuming it split a prepared dataloader).
    accelerator.register_for_checkpointing(scheduler, loss_fn)
    # A task's extra state (a momentum teacher): on the device, in every checkpoint, not DDP.
    extras = task.extra_modules()
    for name in sorted(extras):
        extras[name].to(accelerator.device)
        accelerator.register_for_checkpointing(extras[name])
    config_yaml = to_yaml(cfg)
    if main:
        write_text(run_dir / "config.yaml", config_yaml, "config")
    if cfg.train.trackers:
        flat = {k: v for k, v in _flatten(cfg).items() if isinstance(v, int | float | str | bool)}
        accelerator.init_trackers("clipkit", config=flat)

    # ------------------------------------------------------------------ resume
    step, epoch, samples_seen = 0, 0, 0
    ckpt = resolve_resume(cfg.train.resume, run_dir)
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt)
        step, epoch, samples_seen = state["step"], state["epoch"], state["samples_seen"]
        _load_data_state(data, state["data"], accelerator)
        was = samples_seen // step if step else 0
        now = cfg.train.batch_size * accum * accelerator.num_processes
        if main and was and was != now:
            log.warning(
                "resume: global batch %d -> %d (%d process(es) x train.batch_size %d x "
                "accum_steps %d); the epoch's remaining samples continue in order, the step "
                "count and schedule go on from step %d to %d",
                *(was, now, accelerator.num_processes, cfg.train.batch_size, accum, step),
                total_steps,
            )
        gone = range(accelerator.num_processes, len(state["data"]))
        _forget_after(run_dir, step, accelerator, total_steps, gone)
        accelerator.print(f"resumed from {ckpt} at step {step} (epoch {epoch})")
    elif cfg.train.resume and cfg.train.resume != "latest":
        raise ValueError(f"train.resume={cfg.train.resume}: nothing to resume")
    elif cfg.train.resume:  # latest, no checkpoint yet: the steps logged so far are redone
        _forget_after(run_dir, 0, accelerator, total_steps)

    unwrapped = accelerator.unwrap_model(model)

    def embed(mb: dict[str, Any]) -> dict[str, Any]:
        dev = accelerator.device
        mb = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
        with accelerator.autocast():
            e = task.embed(model, mb)
        scale = e.logit_scale if e.logit_scale is not None else task.logit_scale(unwrapped)
        # GradCache works on a plain dict of the loss's inputs; a task's extra row tensors
        # travel as "extra/<name>" so they are concatenated and replayed like q and k.
        out = {
            "q": e.q,
            "k": e.k,
            "hard_negatives": e.hard_negatives,
            "logit_scale": scale,
            "logit_bias": e.logit_bias,
        }
        out.update({f"extra/{name}": t for name, t in e.extra.items()})
        out.update({f"shared/{name}": t for name, t in e.shared.items()})
        return out

    def compute_loss(e: dict[str, Any]) -> torch.Tensor:
        # The loss runs in at least float32 (bf16/fp16 embeddings widened; float64 kept).
        hn = e.get("hard_negatives")
        extra = {
            n.split("/", 1)[1]: widen(t)
            for n, t in e.items()
            if n.startswith(("extra/", "shared/")) and t is not None
        }
        return loss_fn(
            widen(e["q"]),
            widen(e["k"]),
            hard_negatives=None if hn is None else widen(hn),
            logit_scale=e.get("logit_scale"),
            logit_bias=e.get("logit_bias"),
            # Only tasks with extra inputs pass them: the other losses keep their signature.
            **({"extra": extra} if extra else {}),
        )

    errors: dict[str, str] = {}  # what failed after the state was safe: shown, never fatal

    def evaluate() -> dict[str, float]:
        """The task's evaluation at ``step``; a failure is reported in one line, not raised.

        Caveat: a failure on one rank only, while the others wait in a collective, still hangs
        until the process group's timeout (evaluation inputs are checked at start to make that
        rare).
        """
        model.eval()
        try:
            with torch.no_grad():
                metrics = task.evaluate(cfg, unwrapped, accelerator, step)
        except Exception as err:  # any evaluator failure must leave the run intact
            first = (str(err).splitlines() or [""])[0]
            errors["eval/error"] = f"step {step}: {type(err).__name__}: {first}"
            accelerator.print(f"evaluation failed at step {step}: {type(err).__name__}: {first}")
            metrics = {}
        finally:
            model.train()
        return {f"eval/{k}": v for k, v in metrics.items()}

    saved_at = step if ckpt is not None else -1  # the step whose state is on disk

    def checkpoint() -> None:
        nonlocal saved_at
        gathered = _gather_objects(accelerator, data.state_dict())
        state = {"step": step, "epoch": epoch, "samples_seen": samples_seen, "data": gathered}
        save_checkpoint(accelerator, run_dir, step, state, config_yaml, cfg.train.keep_last)
        saved_at = step

    # ------------------------------------------------------------------ steps
    global_batch = cfg.train.batch_size * accum * accelerator.num_processes
    accelerator.print(
        f"training {total_steps} steps ({steps_per_epoch}/epoch), global batch {global_batch}, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}; outputs in {run_dir}"
    )
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="train", unit="step")
    metrics_file = run_dir / "metrics.jsonl"
    nonfinite, history = 0, []
    kill_at = int(os.environ.get("CLIPKIT_FAULT_KILL_AT_STEP", "0"))
    rank = accelerator.process_index
    model.train()
    if ckpt is None:
        data.set_epoch(epoch)  # a resumed loader already sits at its saved epoch and position
    batches = iter(data)
    # A resumed loader may sit at the very end of its epoch; only a full epoch must yield.
    got_in_epoch, full_epoch = 0, ckpt is None
    t_last, wait_time, step_time, last_logged = time.perf_counter(), 0.0, 0.0, step
    while step < total_steps:
        # Gather this step's micro-batches, rolling into the next epoch when one ends.
        t0 = time.perf_counter()
        micro: list[dict[str, Any]] = []
        while len(micro) < accum:
            try:
                micro.append(next(batches))
                got_in_epoch += 1
            except StopIteration:
                if full_epoch and got_in_epoch == 0:
                    # Every sample was skipped: rolling on would spin through empty epochs forever.
                    skips = {k: v for k, v in data.stats.items() if v}
                    raise ValueError(
                        f"data: epoch {epoch} gave process {accelerator.process_index} no usable "
                        f"batch (skipped: {skips or 'nothing'}); check data.train"
                    ) from None
                got_in_epoch, full_epoch = 0, True
                epoch += 1
                data.set_epoch(epoch)
                batches = iter(data)
                micro = []  # a step never spans two epochs: drop_last at step granularity
        t1 = time.perf_counter()
        wait_time += t1 - t0

        loss, finite = step_gradients(micro, embed, compute_loss, accelerator, model)
        if not finite:
            # Never average a NaN/inf into the weights: skip the update and count.
            optimizer.zero_grad(set_to_none=True)
            nonfinite += 1
            accelerator.print(f"step {step}: non-finite loss ({loss.item()}), update skipped")
            if nonfinite >= cfg.train.max_nonfinite:
                raise NonFiniteLossError(
                    f"{nonfinite} consecutive non-finite losses at step {step}; lower optim.lr "
                    f"or use train.precision=fp32/bf16"
                )
            continue
        nonfinite = 0
        task.before_update(unwrapped, step)
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(
                list(model.parameters()) + list(loss_fn.parameters()), cfg.optim.grad_clip
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(unwrapped, "clamp_logit_scale"):
            unwrapped.clamp_logit_scale(cfg.loss.max_logit_scale)
        loss_fn.clamp_()
        step += 1
        task_logs = task.after_step(unwrapped, step, total_steps)
        samples_seen += global_batch
        if cfg.train.record_keys:
            keys = [k for mb in micro for k in mb.get("key", [])]
            with (run_dir / f"keys.rank{accelerator.process_index}.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "keys": keys}) + "\n")
        step_time += time.perf_counter() - t1
        if step == kill_at and os.environ.get("CLIPKIT_FAULT_KILL_RANK", str(rank)) == str(rank):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
        bar.update(1)

        # Logging: a flat dict of scalars with slash names.
        if step % cfg.train.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            elapsed = now - t_last
            logs = {
                "train/loss": accelerator.reduce(loss.detach().float(), "mean").item(),
                "train/lr": scheduler.get_last_lr()[0],
                "train/epoch": epoch,
                "train/samples_seen": samples_seen,
                "train/samples_per_s": global_batch * (step - last_logged) / max(elapsed, 1e-9),
                "train/data_wait_frac": wait_time / max(wait_time + step_time, 1e-9),
            }
            scale = getattr(unwrapped, "logit_scale", None)
            if torch.is_tensor(scale):
                logs["train/logit_scale"] = scale.exp().item()
            if grad_norm is not None:
                logs["train/grad_norm"] = float(grad_norm)
            logs.update({f"train/{k}": float(v) for k, v in task_logs.items()})
            # A loss made of parts (SLIP: loss_clip, loss_ssl) keeps its last call's values.
            for k, v in getattr(loss_fn, "parts", {}).items():
                logs[f"train/{k}"] = accelerator.reduce(v.float(), "mean").item()
            if accelerator.device.type == "cuda":
                logs["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            t_last, wait_time, step_time, last_logged = now, 0.0, 0.0, step
            bar.set_postfix(loss=f"{logs['train/loss']:.3f}", lr=f"{logs['train/lr']:.2e}")
            _record(accelerator, metrics_file, step, logs, history)
        # The checkpoint first: an evaluation that fails or hangs must not cost this step.
        paused = time.perf_counter()
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            checkpoint()
        if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
            _record(accelerator, metrics_file, step, evaluate(), history)
        # train/samples_per_s measures training: checkpoint and evaluation time is left out.
        t_last += time.perf_counter() - paused
    bar.close()

    # ------------------------------------------ final checkpoint + export, THEN evaluation
    # The run's state and its export are written before anything that may fail, so a bad
    # evaluation set costs a line in the log, never the run.
    if saved_at != step:
        checkpoint()
    if main:
        # Written beside and renamed into place: a failed export never leaves half a folder.
        export_tmp, export_dir = run_dir / "export.tmp", run_dir / "export"
        shutil.rmtree(export_tmp, ignore_errors=True)
        try:
            task.export(cfg, unwrapped, str(export_tmp))
            shutil.rmtree(export_dir, ignore_errors=True)
            export_tmp.rename(export_dir)
        except Exception as err:  # the checkpoint is safe; say what failed
            disk = as_write_error(err, run_dir)  # measured before the cleanup frees space
            shutil.rmtree(export_tmp, ignore_errors=True)
            if disk is not None:  # the disk, not the model: one line, exit 2
                raise write_failed(
                    "export",
                    export_dir,
                    disk,
                    hint="rerun with train.resume=latest (it only exports)",
                ) from None
            first = (str(err).splitlines() or [""])[0]
            errors["export/error"] = f"{type(err).__name__}: {first}"
            accelerator.print(f"export failed: {errors['export/error']}")
    accelerator.wait_for_everyone()
    final = evaluate()
    _record(accelerator, metrics_file, step, final, history)
    result = {"step": step, "epoch": epoch, "samples_seen": samples_seen, **final, **errors}
    result["train/final_loss"] = next(
        (h["train/loss"] for h in reversed(history) if "train/loss" in h), math.nan
    )
    result["data/stats"] = dict(data.stats)
    if main:
        write_text(run_dir / "metrics.json", json.dumps(result, indent=1, default=str), "metrics")
    accelerator.end_training()
    return result


def _load_data_state(data: Any, saved: list[Any], accelerator: Accelerator) -> None:
    """Every rank's saved positions to a loader that resumes on another layout
    (:class:`clipkit.data.ShardLoader`: ``elastic``), this rank's to other data."""
    if getattr(data, "elastic", False):
        data.load_state_dict(saved)
    elif len(saved) != accelerator.num_processes:
        raise ValueError(
            f"train.resume: the checkpoint was written by {len(saved)} process(es), this run "
            f"has {accelerator.num_processes}; this task's data resumes on the same number"
        )
    else:
        data.load_state_dict(saved[accelerator.process_index])


def _gather_objects(accelerator: Accelerator, obj: Any) -> list[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _record(
    accelerator: Accelerator, path: Path, step: int, logs: dict[str, float], history: list
) -> None:
    history.append({"step": step, **logs})
    accelerator.log(logs, step=step)
    if accelerator.is_main_process:
        try:
            with path.open("a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        except OSError as err:
            hint = "resume with train.resume=latest"
            raise write_failed(f"metrics at step {step}", path.parent, err, hint=hint) from None
        if any(k.startswith("eval/") for k in logs):
            tqdm.write(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in logs.items()))


def _forget_after(
    run_dir: Path, step: int, accelerator: Accelerator, total_steps: int, gone: range = range(0)
) -> None:
    """Drop the log lines that a run resumed at ``step`` writes again, so each step is logged once.

    ``gone``: ranks of the checkpoint that this run (on fewer processes) does not have; the main
    process cuts their key logs too.

    The resumed run redoes every step after ``step``; at ``step`` itself it writes again only
    the final evaluation, when nothing is left to train. Lines of the checkpoint's own step
    (its training log, an evaluation that finished before the kill) are kept.
    """
    done = step >= total_steps

    def keep(rec: dict[str, Any]) -> bool:
        s = rec.get("step", 0)
        if s != step:
            return s < step
        return not done or any(k.startswith("train/") for k in rec)

    if accelerator.is_main_process:
        truncate_jsonl(run_dir / "metrics.jsonl", keep, "metrics")
    ranks = [accelerator.process_index]
    if accelerator.is_main_process:
        ranks += list(gone)
    for keys in (run_dir / f"keys.rank{r}.jsonl" for r in ranks):
        truncate_jsonl(keys, lambda rec: rec.get("step", 0) <= step, "train.record_keys")


def _flatten(cfg: Config) -> dict[str, Any]:
    from dataclasses import asdict

    out: dict[str, Any] = {}
    for section, values in asdict(cfg).items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        else:
            out[section] = "" if values is None else values
    return out
