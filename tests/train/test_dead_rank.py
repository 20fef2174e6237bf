"""A process that dies mid-run: the survivor stops in one line naming the lost rank and the
checkpoint to resume from, and ``train.resume=latest`` continues from that checkpoint.

No timing is asserted: the launches only have to end (generous subprocess timeouts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(run: Path, cache: Path) -> list[str]:
    return [
        f"data.cache_dir={cache}",
        f"train.output_dir={run}",
        "data.workers=0",
        "train.batch_size=32",
        "train.max_steps=8",
        "train.checkpoint_every=3",
        "train.record_keys=true",
        "train.log_every=1",
        "train.trackers=[]",
        "train.torch_threads=1",
        "optim.warmup_steps=2",
    ]


def _launch(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=600,
    )


def _messages(stderr: str) -> list[str]:
    """stderr without the progress bar's lines."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [x for x in lines if x.strip() and not x.startswith("train:")]


@pytest.mark.slow
def test_sigkilled_rank_is_one_line_and_resume_continues(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    # Rank 0 (the main process, with the progress bar) SIGKILLs itself right after step 5
    # (checkpoints at steps 3 and 6: 3 is the last complete one); rank 1 is then inside the next
    # step's collectives. The second launch below loses rank 1 instead.
    fault = {"CLIPKIT_FAULT_KILL_AT_STEP": "5", "CLIPKIT_FAULT_KILL_RANK": "0"}
    launch = [sys.executable, "-m", "clipkit.train.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    res = _launch([*launch, str(REPO / "scripts" / "train.py"), *_args(run, cache)], fault)
    ckpt = run / "checkpoints" / "step_0000003"
    # python -m clipkit.train.launch: the survivor's line is all the user reads; the status is
    # the first failing rank's (rank 0: SIGKILL, 128 + 9).
    msgs = _messages(res.stderr)
    assert len(msgs) == 1 and msgs[0].startswith("error: lost rank 0 of 2 (gloo: "), msgs
    line = msgs[0]
    assert f"resume from {ckpt} with train.resume=latest" in line, line
    assert res.returncode == 137
    assert not (run / "export").exists()

    # The same under plain torchrun: the survivor's one line, no traceback from clipkit's side
    # (torchrun's own failure summary, naming rank 1's SIGKILL as the root cause, remains).
    run2 = tmp_path / "run2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    fault["CLIPKIT_FAULT_KILL_RANK"] = "1"
    res = _launch([*torchrun, str(REPO / "scripts" / "train.py"), *_args(run2, cache)], fault)
    assert res.returncode != 0
    errors = [x for x in _messages(res.stderr) if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lost rank 1 of 2"), res.stderr[-3000:]
    assert not any(x.startswith("[rank0]") for x in _messages(res.stderr)), res.stderr[-3000:]
    assert "Signal 9 (SIGKILL) received" in res.stderr  # torchrun's summary: unavoidable there

    # Resume: from the last complete checkpoint, every step's keys once, no sample twice (8
    # steps x 64 stay inside epoch 0's 22 steps).
    res = _launch(
        [*torchrun[:-1], str(_free_port()), str(REPO / "scripts" / "train.py")]
        + _args(run, cache)
        + ["train.resume=latest"],
        {},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {ckpt} at step 3" in res.stdout
    keys = []
    for r in (0, 1):
        recs = [json.loads(x) for x in (run / f"keys.rank{r}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in recs] == list(range(1, 9))
        keys += [k for x in recs for k in x["keys"]]
    assert len(keys) == len(set(keys)) == 8 * 64
    assert (run / "export" / "open_clip_model.safetensors").is_file()


# Two gloo processes with a 3 s collective timeout; rank 1 stops answering (sleeps) while rank 0
# waits in an all_reduce under the guard. Rank 0 must come out with the one line naming rank 1.
_HUNG = """
import os, sys, time, datetime
import torch, torch.distributed as dist
from clipkit.train.fault import rank_failure_guard, RankLostError
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
dist.all_reduce(torch.ones(1))  # both alive: one collective that works
if rank == 1:
    time.sleep(120)  # hung, not dead: only the timeout can tell
    sys.exit(0)
try:
    with rank_failure_guard(sys.argv[1]):
        dist.all_reduce(torch.ones(1))
except RankLostError as err:
    print(f"RANKLOST all_ranks={err.all_ranks} {err}")
"""


def test_hung_peer_is_named_after_the_collective_timeout(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_0000004").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_0000004" / "trainer_state.json").write_text("{}")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env.update(WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HUNG, str(tmp_path / "run")],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        out, err = procs[0].communicate(timeout=120)  # it ends: no timing asserted
    finally:
        procs[1].kill()
        procs[1].communicate()
    lines = [x for x in out.splitlines() if x.startswith("RANKLOST")]
    assert len(lines) == 1, err[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000004"
    assert lines[0].startswith("RANKLOST all_ranks=False lost rank 1 of 2 (gloo: "), lines
    assert f"resume from {ckpt} with train.resume=latest" in lines[0]
