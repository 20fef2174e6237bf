"""Issue 17, the trainer's side: a full disk, unwritable outputs, resumed logs, launcher errors.

Each failure must be one line and exit 2, leave nothing half-written, and a resume after it must
continue from the last complete checkpoint. ENOSPC is provoked portably by patching the write
path; as root, one test also fills a real (tmpfs) filesystem.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from accelerate import Accelerator
from safetensors.torch import load_file

from clipkit.train.cli import main

REPO = Path(__file__).resolve().parents[2]


def _args(run: Path, cache: Path, steps: int) -> list[str]:
    return [
        f"data.cache_dir={cache}",
        f"train.output_dir={run}",
        "train.batch_size=64",
        "train.log_every=1",
        "train.trackers=[]",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "train.torch_threads=2",
        "train.checkpoint_every=1",
        "train.keep_last=1",
        "train.record_keys=true",
        "eval.every=0",
        f"train.max_steps={steps}",
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _steps(run: Path) -> list[int]:
    """The step of every training-log line of metrics.jsonl, in file order."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if "train/loss" in x]


def _error_lines(err: str) -> list[str]:
    """stderr without the progress bar: the error line(s), and any traceback."""
    assert "Traceback" not in err, err[-3000:]
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("train:")]


def _leftovers(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if ".tmp" in p.name)


def _same_export(a: Path, b: Path) -> None:
    x = load_file(str(a / "export" / "open_clip_model.safetensors"))
    y = load_file(str(b / "export" / "open_clip_model.safetensors"))
    assert x.keys() == y.keys()
    for name in x:
        assert (x[name] - y[name]).abs().max().item() <= 1e-6, name


def test_enospc_in_checkpoint_is_one_line_and_resume_is_exact(tmp_path, cache, capsys, monkeypatch):
    """Step 2's checkpoint fails half-written: one line with the folder and the bytes needed,
    no .tmp left; resume continues from step 1 exactly, logging every step once."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(_args(ref, cache, 3)) == 0
    capsys.readouterr()

    real_save = Accelerator.save_state

    def full_disk(self, output_dir=None, **kw):
        real_save(self, output_dir, **kw)  # the files are written, then the disk is full
        if output_dir.endswith("step_0000002.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return output_dir

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    assert main(_args(run, cache, 3)) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith(f"error: checkpoint step 2: cannot write {run / 'checkpoints'}")
    assert "No space left on device" in err[0] and "the size of step_0000001" in err[0]
    assert "needs about" in err[0] and "train.resume=latest" in err[0]
    assert _leftovers(run) == []
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]
    assert _steps(run) == [1, 2]  # step 2 was logged before its checkpoint failed

    # A killed save elsewhere left a stale folder: the resume removes it before anything else.
    stale = run / "checkpoints" / "step_0000007.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert main(_args(run, cache, 3) + ["train.resume=latest"]) == 0
    resumed = f"resumed from {run / 'checkpoints' / 'step_0000001'} at step 1"
    assert resumed in capsys.readouterr().out
    assert _leftovers(run) == []
    assert _steps(run) == [1, 2, 3]  # each step once
    keys = [json.loads(x)["step"] for x in (run / "keys.rank0.jsonl").read_text().splitlines()]
    assert keys == [1, 2, 3]
    assert (run / "keys.rank0.jsonl").read_text() == (ref / "keys.rank0.jsonl").read_text()
    _same_export(ref, run)


@pytest.mark.slow
def test_enospc_on_one_rank_stops_every_rank_in_one_line(tmp_path, cache):
    """2 gloo processes, only rank 1's write fails: both stop (no hang in a collective), exit 2,
    the folder is removed, one line is printed (by rank 0, with rank 1's reason)."""
    from tests.conftest import _free_port

    run = tmp_path / "run"
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(_free_port())),
        str(REPO / "tests" / "train" / "enospc_worker.py"),
        *_args(run, cache, 3),
        *("train.batch_size=32", "train.torch_threads=1", "train.record_keys=false"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENOSPC_RANK": "1", "ENOSPC_STEP": "2"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"error: checkpoint step 2: cannot write {run / 'checkpoints'}")
    assert "No space left on device" in lines[0] and "step_0000001" in lines[0]
    assert "exitcode: 2" in res.stderr  # torchrun's summary: the trainer's status, not a crash
    assert _leftovers(run) == []
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000001"]


def test_enospc_in_export_leaves_no_half_export(tmp_path, cache, capsys, monkeypatch):
    from clipkit.train.clip_task import ClipTask

    def full_disk(self, cfg, model, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "open_clip_model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ClipTask, "export", full_disk)
    run = tmp_path / "run"
    assert main(_args(run, cache, 1)) == 2
    err = _error_lines(capsys.readouterr().err)
    assert err == [
        f"error: export: cannot write {run / 'export'}: No space left on device; "
        + err[0].split("; ", 1)[1]
    ]
    assert "free" in err[0]
    assert not (run / "export").exists() and _leftovers(run) == []
    assert (run / "checkpoints" / "step_0000001" / "trainer_state.json").is_file()


def test_enospc_in_metrics_log_is_one_line(tmp_path, cache, capsys, monkeypatch):
    real_open = Path.open

    def full_disk(self, mode="r", *a, **k):
        if self.name == "metrics.jsonl" and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", full_disk)
    run = tmp_path / "run"
    assert main(_args(run, cache, 2)) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: metrics at step 1: cannot write {run}: ")
    assert "No space left on device" in err[0] and "train.resume=latest" in err[0]


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root"
)
def test_real_small_filesystem(tmp_path, cache, capsys):
    """The run folder on a 150 MiB tmpfs (a checkpoint is ~85 MiB): the second checkpoint hits a
    real ENOSPC (torch.save says RuntimeError); after a stale .tmp fills the disk and the
    filesystem grows, resume=latest sweeps the stale folder and finishes."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        run = mnt / "run"
        assert main(_args(run, cache, 3)) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1, err
        assert "No space left on device" in err[0] and str(run / "checkpoints") in err[0]
        assert "needs about" in err[0]
        assert _leftovers(run) == []
        # A save killed mid-write (SIGKILL: no cleanup) left a folder that fills the disk (of
        # a step this run does not save again, so only the sweep at start can remove it).
        stale = run / "checkpoints" / "step_0000009.tmp"
        stale.mkdir()
        with pytest.raises(OSError), (stale / "model.safetensors").open("wb") as f:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        # Someone frees space: 210 MiB hold two checkpoints and the export (~200 MiB), but
        # not those and the stale folder, so this resume passes only if it swept it first.
        subprocess.run(["mount", "-o", "remount,size=210m", str(mnt)], check=True)
        assert main(_args(run, cache, 3) + ["train.resume=latest"]) == 0
        assert _steps(run) == [1, 2, 3] and _leftovers(run) == []
        assert (run / "export" / "open_clip_model.safetensors").is_file()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("kind", ["file", "parent_is_file", "read_only"])
def test_unwritable_output_dir_fails_before_work(tmp_path, cache, capsys, monkeypatch, kind):
    import clipkit.train.loop as loop

    monkeypatch.setattr(loop.get_task("clip"), "build_model", None)  # any work would crash
    if kind == "file":
        out = tmp_path / "out"
        out.write_text("")
        needle = "is a file"
    elif kind == "parent_is_file":
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "run"
        needle = "is not writable: Not a directory"
    else:
        out = tmp_path / "ro"

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr("clipkit.train.outputs.tempfile.mkstemp", read_only)
        needle = "is not writable: Read-only file system"
    assert main(_args(out, cache, 1)) == 2
    err = _error_lines(capsys.readouterr().err)
    assert err == [f"error: train.output_dir={out} {needle}"] or (
        len(err) == 1 and needle in err[0] and str(out) in err[0]
    ), err


@pytest.mark.parametrize(
    "content",
    ["", "{}", "[]", '{"step": 1}', '{"step": 1, "epoch": 0, "samples_seen": 64, "data": {}}'],
)
def test_malformed_trainer_state_is_one_line(tmp_path, cache, capsys, content):
    ck = tmp_path / "run" / "checkpoints" / "step_0000001"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(content)
    assert main(_args(tmp_path / "run", cache, 2) + ["train.resume=latest"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"error: corrupt checkpoint {ck}: trainer_state.json" in err[0], err


def test_full_disk_is_not_an_unwritable_output_dir(tmp_path, monkeypatch):
    """A full disk passes the start check: the run sweeps stale .tmp folders before writing."""
    from clipkit.train.outputs import check_output_dir

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("clipkit.train.outputs.tempfile.mkstemp", full)
    check_output_dir(tmp_path / "run")  # no error
    assert (tmp_path / "run").is_dir()


def test_resume_of_finished_run_logs_final_eval_once(tmp_path):
    """Unit: the lines a resumed run writes again are dropped, the checkpoint's own kept."""
    from clipkit.train.loop import _forget_after

    class Acc:
        is_main_process, process_index = True, 0

    recs = [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "train/loss": 0.9},
        {"step": 2, "eval/acc1": 0.5},
        {"step": 3, "train/loss": 0.8},
    ]
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 3, "tor'
    path.write_text(text)
    _forget_after(tmp_path, 2, Acc(), total_steps=5)  # mid-run: step 2's eval is not redone
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:3]
    _forget_after(tmp_path, 2, Acc(), total_steps=2)  # finished: the final eval runs again
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:2]
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------ clipkit eval --output
def _eval_args(output: str) -> argparse.Namespace:
    from clipkit.eval import driver
    from tests.eval.test_driver import MEAN

    parser = argparse.ArgumentParser()
    driver.add_arguments(parser, MEAN)
    return parser.parse_args(["--model", "m", "--data", "toy/test.tar", "--output", output])


@pytest.mark.parametrize("kind", ["folder", "no_parent", "read_only"])
def test_eval_output_checked_before_evaluation(tmp_path, monkeypatch, kind):
    from clipkit.eval import driver
    from tests.eval.test_driver import MEAN

    ran = []
    evaluator = driver.Evaluator(
        "mean", "toy", MEAN.options, lambda ctx: ran.append(1), MEAN.add_options,
        load=lambda *a: ran.append(1),
    )  # fmt: skip
    if kind == "folder":
        out, needle = tmp_path, "is a folder"
    elif kind == "no_parent":
        out, needle = tmp_path / "nope" / "r.json", "folder does not exist"
    else:
        out, needle = tmp_path / "r.json", "not writable"

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr("clipkit.train.outputs.tempfile.mkstemp", read_only)
    with pytest.raises(ValueError, match=needle) as info:
        driver.run_cli(evaluator, _eval_args(str(out)))
    assert "\n" not in str(info.value) and ran == []
    assert not list(tmp_path.rglob("*.tmp*"))


def test_eval_write_failure_leaves_no_tmp(tmp_path, monkeypatch):
    from clipkit.eval import driver

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "replace", full)
    with pytest.raises(ValueError, match="No space left on device") as info:
        driver.write_json(str(tmp_path / "r.json"), {"a": 1})
    assert str(tmp_path / "r.json") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_clipkit_eval_output_folder_is_one_line_exit_2(tmp_path, capsys):
    """Through the console script: the model is never loaded (it does not exist)."""
    from clipkit.cli import main as clipkit_main

    missing_model = str(tmp_path / f"no_model_{uuid.uuid4().hex}")
    rc = clipkit_main(
        ["eval", "zeroshot", "--model", missing_model, "--data", str(tmp_path),
         "--output", str(tmp_path)]
    )  # fmt: skip
    assert rc == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "is a folder" in err[0], err


# ------------------------------------------------------------------ accelerate launch
def test_launcher_passes_one_line_error_and_exit_2(tmp_path):
    """``python -m clipkit.train.launch`` = accelerate launch without its traceback."""
    flags = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
    cmd = [sys.executable, "-m", "clipkit.train.launch", *flags, "--dynamo_backend", "no"]
    cmd += [str(REPO / "scripts" / "train.py"), "train.batch_sise=8"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    err = _error_lines(res.stderr)
    assert err == ["error: override 'train.batch_sise=8': unknown config key 'train.batch_sise'"]


def test_launcher_maps_torchrun_child_failure(monkeypatch):
    """Multi-GPU launches fail through torchrun's ChildFailedError: the child's status wins."""
    import accelerate.commands.launch as acc
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from clipkit.train import launch

    def failed(args):
        fail = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file="/nonexistent")
        raise ChildFailedError("scripts/train.py", {0: fail})

    monkeypatch.setattr(acc, "launch_command", failed)
    assert launch.main(["scripts/train.py", "x=1"]) == 2
