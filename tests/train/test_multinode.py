"""Two "nodes" on one host: two torchrun agents (``--nnodes 2 --node_rank 0|1``, one process
each) meet at a free loopback port, train, checkpoint and resume; each node reads its own
shards. The same launch line, with a real head node's address, is what
configs/slurm/train.sbatch runs on every node of a SLURM allocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from clipkit.data.digits import prepare_digits
from tests.conftest import _free_port, launch_report

REPO = Path(__file__).resolve().parents[2]


def _two_nodes(args: list[str], tmp_path: Path, tag: str) -> list[subprocess.CompletedProcess]:
    """Both nodes' torchrun, started together; their outputs once both have ended."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--node_rank", str(node), "--nproc_per_node", "1"]
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}", str(REPO / "scripts" / "train.py"), *args]
        out = open(tmp_path / f"{tag}.node{node}.out", "w+")  # noqa: SIM115  (read back below)
        err = open(tmp_path / f"{tag}.node{node}.err", "w+")  # noqa: SIM115
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append((subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True), out, err))
    done = []
    for p, out, err in procs:
        try:
            p.wait(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
        out.seek(0)
        err.seek(0)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    for res in done:
        assert res.returncode == 0, launch_report(res.stderr)
    return done


def _keys(run: Path, rank: int) -> dict[int, list[str]]:
    lines = (run / f"keys.rank{rank}.jsonl").read_text().splitlines()
    return {rec["step"]: rec["keys"] for rec in map(json.loads, lines)}


@pytest.mark.slow
def test_two_node_loopback_trains_checkpoints_resumes(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    train_dir = prepare_digits(cache)["train"]  # built once, before both nodes look for it
    shard_of = {}
    for tar in sorted(train_dir.glob("*.tar")):
        with tarfile.open(tar) as t:
            shard_of.update({m.name.split(".")[0]: tar.name for m in t.getmembers()})
    args = [
        f"data.cache_dir={cache}",
        f"train.output_dir={run}",
        "data.workers=0",
        "train.batch_size=32",
        "train.checkpoint_every=2",
        "train.record_keys=true",
        "train.log_every=1",
        "train.trackers=[]",
        "train.torch_threads=1",
    ]
    first = _two_nodes([*args, "train.max_steps=4"], tmp_path, "first")
    assert "2 process(es)" in first[0].stdout  # one process per node, one process group
    assert (run / "checkpoints" / "step_0000004" / "trainer_state.json").is_file()
    before = {r: _keys(run, r) for r in (0, 1)}

    resumed = _two_nodes([*args, "train.max_steps=6", "train.resume=latest"], tmp_path, "again")
    assert f"resumed from {run / 'checkpoints' / 'step_0000004'} at step 4" in resumed[0].stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["samples_seen"] == 6 * 2 * 32
    state = json.loads((run / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert len(state["data"]) == 2
    after = {r: _keys(run, r) for r in (0, 1)}
    shards = {}
    for r in (0, 1):
        assert sorted(after[r]) == list(range(1, 7))
        assert {s: after[r][s] for s in range(1, 5)} == before[r]  # steps 1-4 not redone
        shards[r] = {shard_of[k] for keys in after[r].values() for k in keys}
    # Epoch mode: the 4 shards are split between the nodes, 2 each, never shared.
    assert shards[0].isdisjoint(shards[1]) and len(shards[0]) == len(shards[1]) == 2, shards


SBATCH = REPO / "configs" / "slurm" / "train.sbatch"


def test_sbatch_example_parses_and_dry_runs():
    """N nodes x 8 GPUs: one torchrun per node (srun task), c10d rendezvous at the first node."""
    import shlex

    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    env = {**os.environ, "SLURM_NNODES": "4", "SLURM_JOB_ID": "77", "HEAD_NODE": "node001"}
    env.update(CLIPKIT_DRY_RUN="1", PATH="/usr/bin:/bin")  # no scontrol: HEAD_NODE is used
    env.pop("SLURM_JOB_NODELIST", None)
    res = subprocess.run(
        ["bash", str(SBATCH), "--config", "my.yaml", "data.train=a/{0..3}.tar"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout) == [
        *("srun", "--kill-on-bad-exit=1", "python", "-m", "torch.distributed.run"),
        *("--nnodes", "4", "--nproc_per_node", "8", "--rdzv-backend", "c10d"),
        *("--rdzv-endpoint", "node001:29500", "--rdzv-id", "77", "scripts/train.py"),
        *("train.resume=latest", "--config", "my.yaml", "data.train=a/{0..3}.tar"),
    ]


@pytest.mark.slow
def test_sbatch_example_runs_and_a_resubmission_resumes(tmp_path):
    """The script for real on this host (SRUN empty: no SLURM), 2 processes; then submitted
    again on 1 process: train.resume=latest continues from its checkpoint (elastic)."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    prepare_digits(cache)
    args = [
        f"data.cache_dir={cache}",
        f"train.output_dir={run}",
        "data.workers=0",
        "train.batch_size=32",
        "train.trackers=[]",
        "train.torch_threads=1",
    ]
    outs = []
    for gpus, steps in (("2", 2), ("1", 3)):
        env = {**os.environ, "SRUN": "", "GPUS_PER_NODE": gpus, "OMP_NUM_THREADS": "1"}
        env.update(MASTER_PORT=str(_free_port()), HEAD_NODE="127.0.0.1")
        res = subprocess.run(
            ["bash", str(SBATCH), *args, f"train.max_steps={steps}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=300,
        )
        assert res.returncode == 0, launch_report(res.stderr)
        outs.append(res.stdout)
    assert "2 process(es)" in outs[0] and "1 process(es)" in outs[1]
    assert f"resumed from {run / 'checkpoints' / 'step_0000002'} at step 2" in outs[1]
    assert json.loads((run / "metrics.json").read_text())["step"] == 3
