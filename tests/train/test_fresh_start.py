"""A fresh start in a used run folder (issue 17): refused in one line before any work, so it never
appends to the earlier run's metrics.jsonl; ``train.resume=latest`` with no checkpoint yet redoes
the logged steps and logs each once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipkit.train.cli import main


def _args(run: Path, cache: Path, steps: int) -> list[str]:
    return [
        f"data.cache_dir={cache}", f"train.output_dir={run}", "train.batch_size=64",
        "train.log_every=1", "train.trackers=[]", "train.torch_threads=2",
        "train.checkpoint_every=1", "train.keep_last=1", "eval.every=0",
        f"train.max_steps={steps}",
    ]  # fmt: skip


def _steps(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if "train/loss" in x]


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err[-3000:]
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("train:")]


def test_fresh_start_in_a_used_folder_is_refused(tmp_path, capsys, monkeypatch) -> None:
    import clipkit.train.loop as loop

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(_args(run, cache, 2)) == 0
    assert _steps(run) == [1, 2]
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(loop.get_task("clip"), "build_model", None)  # any work would crash
    assert main(_args(run, cache, 2)) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert f"train.output_dir={run} already holds a run (metrics.jsonl, metrics.json, " in err[0]
    assert "1 checkpoint(s) up to step_0000002, export/)" in err[0]
    assert "train.resume=latest" in err[0] and "new train.output_dir" in err[0]
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("resume", ["", "latest"])
def test_empty_or_new_folder_starts(tmp_path, resume) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("a person's file is no earlier run")
    extra = [f"train.resume={resume}"] if resume else []
    assert main(_args(run, tmp_path / "cache", 1) + extra) == 0
    assert _steps(run) == [1]


def test_resume_latest_without_checkpoint_logs_each_step_once(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    # An earlier run killed before its first checkpoint logged steps 1-3.
    old = [{"step": s, "train/loss": 9.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert main(_args(run, tmp_path / "cache", 2) + ["train.resume=latest"]) == 0
    steps = _steps(run)
    assert steps == [1, 2], steps
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(x.get("train/loss") != 9.0 for x in lines)  # the old lines are gone
