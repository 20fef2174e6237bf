"""End-to-end runs of the training loop on the embedded digits (CPU, tiny, fast)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from clipkit.train.cli import main

REPO = Path(__file__).resolve().parents[2]


def _common(tmp_path: Path, cache: Path, out: str) -> list[str]:
    return [
        f"data.cache_dir={cache}",
        f"train.output_dir={tmp_path / out}",
        "train.batch_size=64",
        "train.log_every=1",
        "train.trackers=[]",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "train.torch_threads=2",
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


@pytest.mark.slow
def test_short_run_learns_and_writes_outputs(tmp_path, cache, capsys):
    rc = main(_common(tmp_path, cache, "run") + ["train.max_steps=40"])
    assert rc == 0
    run = tmp_path / "run"
    losses = _losses(run)
    assert len(losses) == 40
    # ln(64) = 4.16 at chance; the mean of the last 5 steps must be well below the first 5.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 40
    assert 0.0 <= metrics["eval/zeroshot/digits/acc1"] <= 1.0
    assert metrics["eval/zeroshot/digits/n"] == 360
    assert (run / "export" / "open_clip_config.json").is_file()
    assert (run / "checkpoints" / "step_0000040" / "trainer_state.json").is_file()
    out = capsys.readouterr().out
    assert "outputs:" in out and str(run) in out


def _keys(run: Path) -> dict[int, list[str]]:
    by_step: dict[int, list[str]] = {}
    for line in (run / "keys.rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step[rec["step"]] = rec["keys"]  # a resumed run rewrites steps after its checkpoint
    return by_step


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(tmp_path, cache):
    args = [
        "train.max_steps=12",
        "train.checkpoint_every=3",
        "train.record_keys=true",
        "train.keep_last=5",
    ]
    # Reference: one uninterrupted run (data order crosses an epoch boundary at step 22/64...).
    assert main(_common(tmp_path, cache, "ref") + args) == 0

    # Interrupted run: the process SIGKILLs itself right after step 8 (a checkpoint exists at
    # step 6, so steps 7-8 are lost and must be redone identically).
    run = tmp_path / "killed"
    env = {**os.environ, "CLIPKIT_FAULT_KILL_AT_STEP": "8"}
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        *_common(tmp_path, cache, "killed"),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(_keys(run)) == 8
    assert not (run / "export").exists()  # really interrupted before the end

    assert main(_common(tmp_path, cache, "killed") + args + ["train.resume=latest"]) == 0
    assert _keys(run) == _keys(tmp_path / "ref")
    a = load_file(str(tmp_path / "ref" / "export" / "open_clip_model.safetensors"))
    b = load_file(str(run / "export" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.name=NoSuchNet", "NoSuchNet"),
        ("train.batch_size=4096", "too few for one batch"),
        ("data.train=/nonexistent/{00000..00003}.tar", "/nonexistent"),
        ("train.precision=fp8", "fp8"),
    ],
)
def test_bad_input_fails_fast_with_one_line(tmp_path, cache, capsys, override, needle):
    argv = _common(tmp_path, cache, "bad") + [override]
    if override.startswith("data.train"):
        argv.append("data.builtin=")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1, err


def test_corrupt_checkpoint_is_one_line(tmp_path, cache, capsys):
    ck = tmp_path / "bad" / "checkpoints" / "step_0000002"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{not json")
    assert main(_common(tmp_path, cache, "bad") + ["train.resume=latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt checkpoint" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_two_process_run_trains_evaluates_checkpoints(tmp_path, cache, torchrun):
    """2 CPU processes (torchrun + gloo; Accelerate reads the environment), end to end."""
    torchrun(
        REPO / "scripts" / "train.py",
        *_common(tmp_path, cache, "ddp"),
        *("train.max_steps=4", "train.batch_size=32", "train.torch_threads=1"),
        timeout=600,
    )
    run = tmp_path / "ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["samples_seen"] == 4 * 32 * 2
    assert metrics["eval/zeroshot/digits/n"] == 360  # both ranks' slices gathered
    state = json.loads((run / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert len(state["data"]) == 2  # one data position per rank
    assert (run / "export" / "open_clip_model.safetensors").is_file()


def test_all_corrupt_data_fails_instead_of_spinning(tmp_path):
    """Every image unreadable: one error line, not an endless roll through empty epochs."""
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "g.tar")) as tw:
        for i in range(40):
            tw.write({"__key__": f"{i:04d}", "jpg": b"not an image" * 10, "txt": "a caption"})
    cmd = [
        *(sys.executable, str(REPO / "scripts" / "train.py"), "data.builtin="),
        *(f"data.train={tmp_path / 'g.tar'}", "data.num_samples=40", "train.max_steps=2"),
        *(f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8", "train.trackers=[]"),
        *("eval.every=0", "data.workers=0"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a hang fails here
    assert res.returncode == 2, res.stderr[-2000:]
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert err == [
        "error: data: epoch 0 gave process 0 no usable batch "
        "(skipped: {'corrupt_image': 40}); check data.train"
    ]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("eval.zeroshot=/nonexistent/test.tar", "/nonexistent/test.tar"),
        ("eval.retrieval=/nonexistent/captions.tsv", "/nonexistent/captions.tsv"),
    ],
)
def test_missing_eval_set_fails_at_start_in_one_line(tmp_path, cache, capsys, override, needle):
    """A typo in an evaluation path costs seconds: nothing is trained, one line names it."""
    assert main(_common(tmp_path, cache, "bad") + [override, "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and override.split("=")[0] in err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_unreadable_eval_set_fails_at_start(tmp_path, cache, capsys):
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(b"this is not a tar archive" * 100)
    argv = _common(tmp_path, cache, "bad") + [f"eval.zeroshot={bad}", "train.max_steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_failing_final_evaluation_keeps_checkpoint_and_export(tmp_path, cache, capsys, monkeypatch):
    """An evaluator that raises after training: the state and the export are already written."""
    from clipkit.train.clip_task import ClipTask

    def broken(self, cfg, model, accelerator, step):
        raise RuntimeError(f"evaluator exploded at step {step}\nsecond line of the message")

    monkeypatch.setattr(ClipTask, "evaluate", broken)
    assert main(_common(tmp_path, cache, "run") + ["train.max_steps=3"]) == 1
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_0000003" / "trainer_state.json").is_file()
    assert (run / "export" / "open_clip_model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 3
    assert metrics["eval/error"] == "step 3: RuntimeError: evaluator exploded at step 3"
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert err == ["error: eval failed: step 3: RuntimeError: evaluator exploded at step 3"]
    # The saved state is whole: the run resumes from it (nothing left to train, so it only
    # evaluates again, and fails again in the same one line).
    assert main(_common(tmp_path, cache, "run") + ["train.max_steps=3", "train.resume=latest"]) == 1
