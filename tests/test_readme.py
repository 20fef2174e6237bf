"""Every command block in README.md runs here, for real, on tiny data (issue 12).

``readme_commands`` parses README.md's ```bash blocks into commands; ``COMMANDS`` maps each one to
how this file runs it. ``test_readme_commands_are_the_table`` fails when the README gains or
changes a command, until the table (and a test) exercises it, so a documented command cannot rot.

The commands run through bash in a working folder laid out as the README assumes::

    tmp/work/              cwd: scripts/, configs/ (links into the repo), captions.tsv + photos/
                           (16 coco_mini images and their captions), my.yaml, shards/, runs/, emb/
    tmp/shared/data     -> the real data (CLIPKIT_DATA), so ``../shared/data/...`` resolves
    tmp/tiny/              small cuts of real data: cifar10/test.tar and train.tar (10 test and 20
                           train images per class, same ImageFolder-tar layout),
                           sts/stsbenchmark/ (64 pairs per split)
    tmp/home/              HOME: caches (the digits demo's shards) start empty, as on a new machine

and are chained as a user would chain them: build shards -> verify -> train on them -> evaluate,
embed, index and serve that run. A shrunk command is the README's text with the substitutions
listed in ``COMMANDS`` applied (each must occur) and its extra arguments appended.

Stand-ins, where the README's command cannot run as written here:

- ``pip install ...``: not run (the test runs inside that install). ``.ci/run`` installs with the
  README's command; ``test_install_commands_are_what_ci_runs`` checks that, and the quick-start
  demo checks that it imports nothing only the ``dev`` extra installs (so ``pip install -e .``
  suffices for it). ``pytest`` is not recursed into: CI runs it.
- ``accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml ... --config my.yaml``
  needs 8 GPUs. The real ``accelerate launch`` reads that very file (DDP, bf16), with ``--cpu
  --num_processes 1`` given on the command line (accelerate lets the command line override a
  config file's values), and trains from a ``my.yaml`` that this file writes
  (the "train on your own data" run as a YAML file). ``accelerate``'s own config loader also
  reads the file and must find DDP on 8 GPUs, and every file in ``configs/accelerate/`` parses.
- ``accelerate launch`` is the real launcher (one CPU process) in every command but unsupervised
  SimCSE, which runs the same script with ``python`` (what accelerate runs for one process,
  without its ~5 s start-up), as its table entry says.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Appended to every CLIP training command: two optimiser steps of 8, no TensorBoard.
TINY_TRAIN = "train.max_steps=2 train.batch_size=8 train.trackers=[]"
# Appended to the SimCSE commands (the packaged MiniLM): 2 steps, short sentences, STS-B dev
# evaluated on 64 pairs instead of 1,500.
TINY_SIMCSE = (
    f"{TINY_TRAIN} simcse.max_length=16 optim.cooldown_steps=2 "
    "eval.sts=../tiny/sts/stsbenchmark/sts-dev.csv"
)
SHARDS_README = "{00000..00127}"
SHARDS_TEST = "{00000..00001}"  # 16 samples in shards of 8: a run has 2 readers (2 workers)
CIFAR_README = "../shared/data/cifar10/test.tar"
CIFAR_TEST = "../tiny/cifar10/test.tar"  # the full set: > 2 min on 2 cores; 100 of its images
CIFAR_TRAIN_README = "../shared/data/cifar10/train.tar"
CIFAR_TRAIN_TEST = "../tiny/cifar10/train.tar"  # 200 of its 50,000 images
# Shrinks an image-SSL config to 2 CPU steps on the CIFAR-10 cuts (same recipe, small backbone).
TINY_SSL = (
    f"data.train={CIFAR_TRAIN_TEST} eval.knn={CIFAR_TEST} eval.knn_train={CIFAR_TRAIN_TEST} "
    "eval.knn_k=5 data.workers=0 train.max_steps=2 train.batch_size=16 train.trackers=[] "
    "ssl.backbone=timm:resnet10t ssl.proj_hidden=64 ssl.proj_dim=32"
)

# Shrinks a CIFAR-10 caption-shard CLIP config (fine-tuning) to 2 CPU steps on the SLIP section's
# shards of the train cut, zero-shot on the test cut.
TINY_CIFAR_CLIP = (
    "data.train=shards/cifar10_train/{00000..00003}.tar data.workers=0 "
    f"eval.zeroshot={CIFAR_TEST} train.max_steps=2 train.batch_size=16 train.trackers=[]"
)


@dataclass(frozen=True)
class Run:
    """How this file runs one README command.

    Attributes:
        name: what the tests call it.
        subs: (README text, test text) pairs applied in order; each must occur.
        extra: arguments appended to the command.
        how: one line on what is run (and why it differs from the README, if it does).
    """

    name: str
    subs: tuple[tuple[str, str], ...] = ()
    extra: str = ""
    how: str = "as written"

    def shell(self, readme: str) -> str:
        cmd = readme
        for old, new in self.subs:
            assert old in cmd, f"README command {readme!r} no longer contains {old!r}"
            cmd = cmd.replace(old, new)
        return f"{cmd} {self.extra}".strip()


# README command (as parsed) -> how it runs here.
COMMANDS: dict[str, Run] = {
    "pip install -e . && accelerate launch scripts/train.py": Run(
        "quickstart",
        subs=(("pip install -e . && ", ""),),
        extra="train.max_steps=2 train.trackers=[]",
        how="install: checked against .ci/run; the demo: real accelerate launch, 2 steps",
    ),
    'pip install -e ".[dev]" && pytest': Run(
        "test_suite", how="not run: checked to be what .ci/run runs (this file is in that run)"
    ),
    "accelerate launch scripts/train.py --config configs/default.yaml train.batch_size=256 "
    "loss.name=siglip": Run(
        "config_example",
        extra="train.max_steps=2 train.trackers=[] train.output_dir=runs/siglip",
        how="real accelerate launch, 2 steps, its own output folder (the demo's is runs/digits)",
    ),
    "python -m data_tools.build_shards captions.tsv shards/ --images photos/ --max-side 512": Run(
        "build_shards",
        extra="--shard-size 8",
        how="16 coco_mini photos with their 80 captions, 2 shards (the default 1,000 makes one)",
    ),
    "python -m data_tools.verify shards/ --grid contact_sheet.png": Run("verify"),
    "accelerate launch scripts/train.py data.builtin= data.train='shards/{00000..00127}.tar' "
    "model.name=ViT-B-32 train.batch_size=256 train.epochs=10 train.precision=bf16 "
    "eval.zeroshot=../shared/data/cifar10/test.tar eval.classnames=cifar10 "
    "eval.templates=cifar10 train.output_dir=runs/mine train.checkpoint_every=500": Run(
        "train_own",
        subs=(
            (SHARDS_README, SHARDS_TEST),
            ("model.name=ViT-B-32", "model.name=clipkit-tiny"),
            (CIFAR_README, CIFAR_TEST),
        ),
        extra=TINY_TRAIN,
        how="real accelerate launch; tiny model, the shards built above, 100 CIFAR-10 images",
    ),
    "accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml scripts/train.py "
    "--config my.yaml": Run(
        "multi_gpu",
        subs=(
            (
                "multi_gpu_8.yaml scripts/train.py",
                "multi_gpu_8.yaml --cpu --num_processes 1 scripts/train.py",
            ),
        ),
        how="the real file, overridden to 1 CPU process; my.yaml written here (see docstring)",
    ),
    "sbatch --nodes 4 configs/slurm/train.sbatch --config my.yaml": Run(
        "slurm",
        subs=(("sbatch --nodes 4", "SLURM_NNODES=4 CLIPKIT_DRY_RUN=1 bash"),),
        how="no SLURM here: the script's dry run prints the launch; tests/train/test_multinode.py "
        "runs the script for real on this host",
    ),
    "clipkit eval zeroshot --model runs/mine/export --data ../shared/data/cifar10/test.tar "
    "--classnames cifar10 --templates cifar10 --output cifar10.json": Run(
        "eval_zeroshot",
        subs=((CIFAR_README, CIFAR_TEST),),
        how="on the run above, 100 CIFAR-10 images",
    ),
    "clipkit eval knn --model runs/mine/export --train ../shared/data/cifar10/train.tar "
    "--data ../shared/data/cifar10/test.tar --output knn.json": Run(
        "eval_knn",
        subs=((CIFAR_TRAIN_README, CIFAR_TRAIN_TEST), (CIFAR_README, CIFAR_TEST)),
        how="on the run above, 200 CIFAR-10 train and 100 test images",
    ),
    "clipkit eval linear-probe --model runs/mine/export --train "
    "../shared/data/cifar10/train.tar --data ../shared/data/cifar10/test.tar --protocol clip "
    "--output probe.json": Run(
        "eval_linear_probe",
        subs=((CIFAR_TRAIN_README, CIFAR_TRAIN_TEST), (CIFAR_README, CIFAR_TEST)),
        how="on the run above, 200 CIFAR-10 train and 100 test images (C searched)",
    ),
    "clipkit eval retrieval --model runs/mine/export --data "
    "../shared/data/coco_mini/captions.tsv --output coco.json": Run(
        "eval_retrieval", how="as written (the real coco_mini: 80 images, 400 captions)"
    ),
    "clipkit eval sts --model runs/simcse_sup/export --data ../shared/data/sts/stsbenchmark "
    "--output sts.json": Run(
        "eval_sts",
        subs=(("../shared/data/sts/stsbenchmark", "../tiny/sts/stsbenchmark"),),
        how="on the SimCSE run below; the three STS-B files cut to 64 pairs each",
    ),
    "accelerate launch scripts/train_simcse.py --config configs/simcse_sup.yaml": Run(
        "simcse_sup", extra=TINY_SIMCSE, how="real accelerate launch, 2 steps of 8 triplets"
    ),
    "accelerate launch scripts/train_simcse.py --config configs/simcse_unsup.yaml": Run(
        "simcse_unsup",
        subs=(("accelerate launch ", "python "),),
        extra=TINY_SIMCSE,
        how="python, not accelerate launch (what accelerate runs for one CPU process, without "
        "its ~5 s start-up), 2 steps of 8 sentences",
    ),
    "accelerate launch scripts/train.py --config configs/simclr_cifar10.yaml": Run(
        "simclr",
        subs=(("accelerate launch ", "python "),),
        extra=TINY_SSL,
        how="python (one CPU process), 2 steps of 16 images of the CIFAR-10 train cut, small "
        "timm backbone, kNN on the cuts",
    ),
    "accelerate launch scripts/train.py --config configs/moco_cifar10.yaml": Run(
        "moco",
        subs=(("accelerate launch ", "python "),),
        extra=TINY_SSL + " loss.queue_size=64",
        how="as simclr, queue of 64 keys",
    ),
    "accelerate launch scripts/train.py --config configs/byol_cifar10.yaml": Run(
        "byol",
        subs=(("accelerate launch ", "python "),),
        extra=TINY_SSL,
        how="as simclr",
    ),
    "accelerate launch scripts/train.py --config configs/barlow_twins_cifar10.yaml": Run(
        "barlow_twins",
        subs=(("accelerate launch ", "python "),),
        extra=TINY_SSL,
        how="as simclr",
    ),
    "accelerate launch scripts/train.py --config configs/swav_cifar10.yaml": Run(
        "swav",
        subs=(("accelerate launch ", "python "),),
        extra=TINY_SSL + " ssl.prototypes=16",
        how="as simclr, 16 prototypes",
    ),
    "python -m data_tools.build_shards ../shared/data/cifar10/train.tar shards/cifar10_train "
    "--shard-size 5000": Run(
        "slip_shards",
        subs=((CIFAR_TRAIN_README, CIFAR_TRAIN_TEST), ("--shard-size 5000", "--shard-size 50")),
        how="the 200-image CIFAR-10 train cut, shards of 50 (4 shards)",
    ),
    "accelerate launch scripts/train.py --config configs/slip_cifar10.yaml": Run(
        "slip",
        subs=(("accelerate launch ", "python "),),
        extra="data.train=shards/cifar10_train/{00000..00003}.tar data.workers=0 "
        f"eval.zeroshot={CIFAR_TEST} eval.knn={CIFAR_TEST} eval.knn_train={CIFAR_TRAIN_TEST} "
        "eval.knn_k=5 train.max_steps=2 train.batch_size=16 train.trackers=[]",
        how="python (one CPU process), 2 steps of 16 on the shards above, zero-shot and kNN on "
        "the CIFAR cuts",
    ),
    "accelerate launch scripts/train.py --config configs/slip_cifar10.yaml loss.ssl_weight=0 "
    "train.output_dir=runs/clip_cifar10": Run(
        "clip_cifar10",
        subs=(("accelerate launch ", "python "),),
        extra=TINY_CIFAR_CLIP + " eval.knn= eval.knn_train=",
        how="python (one CPU process), 2 steps of 16 on the SLIP section's shards, zero-shot on "
        "the CIFAR test cut",
    ),
    "accelerate launch scripts/train.py --config configs/finetune_cifar10.yaml": Run(
        "finetune",
        subs=(("accelerate launch ", "python "),),
        extra=TINY_CIFAR_CLIP,
        how="python (one CPU process), from runs/clip_cifar10 above, 2 steps of 16 on the same "
        "shards, zero-shot on the CIFAR test cut",
    ),
    "clipkit wise-ft --zeroshot runs/clip_cifar10 --finetuned runs/finetune_cifar10 --alpha 0.5 "
    "--output runs/wise_ft": Run("wise_ft", how="as written, on the two runs above"),
    "clipkit wise-ft --zeroshot runs/clip_cifar10 --finetuned runs/finetune_cifar10 --alphas "
    "0,0.25,0.5,0.75,1 --eval ../shared/data/cifar10/test.tar --classnames cifar10 --templates "
    "cifar10 --output wise_ft_sweep": Run(
        "wise_ft_sweep",
        subs=((CIFAR_README, CIFAR_TEST),),
        how="on the two runs above, 100 CIFAR-10 test images per point",
    ),
    "clipkit embed --model runs/mine --input 'shards/{00000..00127}.tar' --output emb/": Run(
        "embed", subs=((SHARDS_README, SHARDS_TEST),), how="the run and shards above"
    ),
    "clipkit index --embeddings emb/ --output emb/index": Run("index"),
    "clipkit serve --model runs/mine --index emb/index --port 8000": Run(
        "serve",
        subs=(("--port 8000", "--port $PORT"),),
        how="a free port; GET / and /health, POST /search, GET /image/{id}; then stopped",
    ),
    "clipkit export runs/mine --format hf --output exports/mine-hf": Run(
        "export_hf", how="the run above"
    ),
    "clipkit export runs/mine --format onnx --output exports/mine-onnx": Run(
        "export_onnx", how="the run above"
    ),
    "clipkit eval zeroshot --model exports/mine-hf --data ../shared/data/cifar10/test.tar "
    "--classnames cifar10 --templates cifar10 --output cifar10_hf.json": Run(
        "eval_zeroshot_hf",
        subs=((CIFAR_README, CIFAR_TEST),),
        how="the HF export above, 100 CIFAR-10 images; equals eval_zeroshot's numbers",
    ),
    "clipkit serve --model exports/mine-onnx --index emb/index --port 8001": Run(
        "serve_onnx",
        subs=(("--port 8001", "--port $PORT"),),
        how="a free port; the ONNX export above over the index of the run's own vectors",
    ),
}

# Top-level modules that only the `dev` extra installs (pyproject.toml), so the quick-start demo,
# which README says `pip install -e .` is enough for, must not import them.
DEV_ONLY_MODULES = ("sentence_transformers", "faiss", "fastapi", "uvicorn", "clip_benchmark")


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block of ``text``, in order.

    Backslash continuations are joined, a ``#`` comment (at the start of a line or after a
    space) is dropped, runs of whitespace become one space, blank lines are skipped.
    """
    commands = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
            if line:
                commands.append(line)
    return commands


def shell(name: str) -> str:
    """The shell command this file runs for the README command called ``name``."""
    (readme, run), *more = [(k, v) for k, v in COMMANDS.items() if v.name == name]
    assert not more, f"two table entries are called {name!r}"
    return run.shell(readme)


def run_cmd(cmd: str, cwd: Path, env: dict[str, str], timeout: int = 600):
    """``bash -c cmd`` in ``cwd``; stdout and stderr captured together."""
    return subprocess.run(
        ["bash", "-c", cmd],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def ok(res: subprocess.CompletedProcess) -> str:
    """The output of a command that must have succeeded (else fail with its tail)."""
    assert res.returncode == 0, f"{res.args[-1]}\nexit {res.returncode}:\n{res.stdout[-4000:]}"
    return res.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the table itself
def test_readme_commands_are_the_table() -> None:
    commands = readme_commands(README.read_text())
    assert len(commands) == len(set(commands)), "a README command appears twice"
    new = [c for c in commands if c not in COMMANDS]
    gone = [c for c in COMMANDS if c not in commands]
    assert not new, f"README commands no test runs (add them to COMMANDS): {new}"
    assert not gone, f"COMMANDS entries the README no longer has: {gone}"
    for readme, run in COMMANDS.items():
        run.shell(readme)  # every substitution still applies


def test_readme_parser() -> None:
    text = "x\n```bash\na --b \\\n    c   # note\n# only a comment\n\n  d 'e#f'\n```\n```py\nz\n```"
    assert readme_commands(text) == ["a --b c", "d 'e#f'"]


def test_install_commands_are_what_ci_runs() -> None:
    """README's install + test commands are .ci/run's (which adds only -q and pytest options)."""
    ci = (REPO / ".ci" / "run").read_text()
    steps = [c.split(" && ") for c in COMMANDS if c.startswith("pip install")]
    assert [s[0] for s in steps] == ["pip install -e .", 'pip install -e ".[dev]"']
    assert 'pip install -q -e ".[dev]"' in ci
    assert steps[1][1] == "pytest" and re.search(r"^python -m pytest\b", ci, flags=re.M)
    # `pip install -e .` installs the core dependencies; the `dev` extra exists for the tests.
    assert re.search(r"^dev = \[", (REPO / "pyproject.toml").read_text(), flags=re.M)


# ------------------------------------------------------------------------------ the working folder
@pytest.fixture(scope="module")
def work(tmp_path_factory, data_root: Path) -> Path:
    """tmp/work laid out as the README assumes (see the module docstring)."""
    tmp = tmp_path_factory.mktemp("readme")
    (tmp / "shared").mkdir()
    (tmp / "shared" / "data").symlink_to(data_root.resolve(), target_is_directory=True)
    (tmp / "home").mkdir()
    work = tmp / "work"
    work.mkdir()
    for name in ("scripts", "configs"):
        (work / name).symlink_to(REPO / name, target_is_directory=True)

    # captions.tsv + photos/: the first 16 coco_mini images, all their captions.
    coco = data_root / "coco_mini"
    with open(coco / "captions.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    keep = sorted({r["filepath"] for r in rows})[:16]
    (work / "photos").mkdir()
    for path in keep:
        shutil.copy(coco / path, work / "photos" / Path(path).name)
    with open(work / "captions.tsv", "w", newline="") as f:
        out = csv.writer(f, delimiter="\t", lineterminator="\n")
        out.writerow(["filepath", "title"])
        out.writerows([Path(r["filepath"]).name, r["title"]] for r in rows if r["filepath"] in keep)

    # tiny/cifar10/{test,train}.tar: the first 10 test (20 train) images of each class, same
    # tar layout.
    (tmp / "tiny" / "cifar10").mkdir(parents=True)
    for split, n in (("test", 10), ("train", 20)):
        per_class: Counter[str] = Counter()
        with (
            tarfile.open(data_root / "cifar10" / f"{split}.tar") as src,
            tarfile.open(tmp / "tiny" / "cifar10" / f"{split}.tar", "w") as dst,
        ):
            for m in src:
                if m.isdir():
                    dst.addfile(m)
                elif m.isfile():
                    cls = Path(m.name).parent.name
                    if per_class[cls] < n:
                        per_class[cls] += 1
                        dst.addfile(m, src.extractfile(m))
        assert len(per_class) == 10 and set(per_class.values()) == {n}

    # tiny/sts/stsbenchmark: the first 64 pairs of each STS-B split.
    sts = tmp / "tiny" / "sts" / "stsbenchmark"
    sts.mkdir(parents=True)
    for src in sorted((data_root / "sts" / "stsbenchmark").glob("sts-*.csv")):
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:64]
        (sts / src.name).write_text("".join(lines), encoding="utf-8")
    return work


@pytest.fixture(scope="module")
def env(work: Path) -> dict[str, str]:
    """This interpreter's scripts first on PATH (python, accelerate, clipkit), a fresh HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(work.parent / "home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="2",  # 2 shared cores
    )
    env.pop("XDG_CACHE_HOME", None)
    return env


def run_readme(name: str, work: Path, env: dict[str, str], **extra_env: str):
    return run_cmd(shell(name), work, {**env, **extra_env})


# ------------------------------------------------------------------------ quick start + config
@pytest.mark.slow
def test_quickstart_demo(work: Path, env: dict[str, str]) -> None:
    """The first command: digits -> shards (first run) -> a tiny CLIP -> zero-shot top-1."""
    res = run_readme("quickstart", work, env, PYTHONPROFILEIMPORTTIME="1")
    out = ok(res)
    assert re.search(r"final metrics: .*eval/zeroshot/digits/acc1=", out), out[-2000:]
    assert "outputs: " in out
    assert (work / "runs" / "digits" / "export" / "open_clip_config.json").is_file()
    imported = set(re.findall(r"^import time:.*\|\s+(\w+)", out, flags=re.M))
    assert imported, "PYTHONPROFILEIMPORTTIME gave no import report"
    assert not imported & set(DEV_ONLY_MODULES), "the demo needs the dev extra"


@pytest.mark.slow
def test_config_example(work: Path, env: dict[str, str]) -> None:
    ok(run_readme("config_example", work, env))
    cfg = (work / "runs" / "siglip" / "config.yaml").read_text()
    assert re.search(r"^loss:\n(  .*\n)*?  name: siglip$", cfg, flags=re.M), cfg
    assert re.search(r"^  batch_size: 256$", cfg, flags=re.M), cfg


# ------------------------------------------------------------------------ train on your own data
@pytest.fixture(scope="module")
def shards(work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_readme("build_shards", work, env)


def test_build_shards(shards, work: Path) -> None:
    ok(shards)
    sizes = json.loads((work / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == 16, sizes


def test_verify(shards, work: Path, env: dict[str, str]) -> None:
    ok(shards)
    out = ok(run_readme("verify", work, env))
    assert out.rstrip().endswith("OK")
    assert (work / "contact_sheet.png").stat().st_size > 0


@pytest.fixture(scope="module")
def trained(shards, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    ok(shards)
    return run_readme("train_own", work, env)


def _export(work: Path, run: str = "mine") -> Path:
    export = work / "runs" / run / "export"
    assert (export / "open_clip_config.json").is_file(), f"no export in runs/{run}"
    return export


@pytest.mark.slow
def test_train_on_own_data(trained, work: Path) -> None:
    ok(trained)
    metrics = json.loads((work / "runs" / "mine" / "metrics.json").read_text())
    acc1 = [k for k in metrics if re.fullmatch(r"eval/zeroshot/[^/]+/acc1", k)]
    assert acc1, sorted(metrics)
    assert metrics[acc1[0].replace("acc1", "n")] == 100
    assert list((work / "runs" / "mine" / "checkpoints").glob("step_*"))
    _export(work)


@pytest.mark.slow
def test_multi_gpu_launch_config(shards, work: Path, env: dict[str, str]) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / "multi_gpu_8.yaml"))
    assert (str(cfg.distributed_type), cfg.num_processes) == ("DistributedType.MULTI_GPU", 8)
    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        load_config_from_file(str(path))  # every launch config parses

    ok(shards)
    (work / "my.yaml").write_text(
        "# The 'train on your own data' run as a config file, shrunk.\n"
        "data:\n  builtin: ''\n  train: shards/" + SHARDS_TEST + ".tar\n"
        "model:\n  name: clipkit-tiny\n"
        "train:\n  batch_size: 8\n  max_steps: 2\n  output_dir: runs/my\n  trackers: []\n"
    )
    out = ok(run_readme("multi_gpu", work, env))
    assert "1 process(es) on cpu" in out
    _export(work, "my")


def test_slurm_example(work: Path, env: dict[str, str]) -> None:
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # as outside a job
    out = ok(run_readme("slurm", work, env, SRUN="srun --kill-on-bad-exit=1", HEAD_NODE="node001"))
    assert out.split() == [
        *("srun", "--kill-on-bad-exit=1", "python", "-m", "torch.distributed.run", "--nnodes"),
        *("4", "--nproc_per_node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint"),
        *("node001:29500", "--rdzv-id", "clipkit", "scripts/train.py", "train.resume=latest"),
        *("--config", "my.yaml"),
    ]


# ------------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def zeroshot(trained, work: Path, env: dict[str, str]) -> dict:
    _export(work)
    ok(run_readme("eval_zeroshot", work, env))
    return json.loads((work / "cifar10.json").read_text())


def test_eval_zeroshot(zeroshot) -> None:
    assert zeroshot["n_samples"] == 100 and zeroshot["skipped"] == 0
    assert 0 <= zeroshot["metrics"]["acc1"] <= 1


@pytest.mark.slow
def test_in_training_zeroshot_equals_cli(trained, zeroshot, work: Path) -> None:
    """Issue 12's acceptance: in-training numbers equal `clipkit eval zeroshot` on the export."""
    ok(trained)
    metrics = json.loads((work / "runs" / "mine" / "metrics.json").read_text())
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        (key,) = [m for m in metrics if re.fullmatch(rf"eval/zeroshot/[^/]+/{k}", m)]
        assert abs(metrics[key] - zeroshot["metrics"][k]) <= 1e-6, (key, metrics[key], zeroshot)


@pytest.mark.parametrize(("name", "output"), [("eval_knn", "knn"), ("eval_linear_probe", "probe")])
def test_eval_knn_linear_probe(name: str, output: str, trained, work: Path, env) -> None:
    _export(work)
    ok(run_readme(name, work, env))
    res = json.loads((work / f"{output}.json").read_text())
    assert (res["n_samples"], res["n_train"], res["skipped"]) == (100, 200, 0), res
    assert 0 <= res["metrics"]["acc1"] <= 1


def test_eval_retrieval(trained, work: Path, env: dict[str, str]) -> None:
    _export(work)
    ok(run_readme("eval_retrieval", work, env))
    res = json.loads((work / "coco.json").read_text())
    assert res["n_samples"] == 80 and res["skipped"] == 0, res
    assert 0 <= res["metrics"]["image_retrieval_recall@5"] <= 1


# --------------------------------------------------------------------------- image self-supervision
@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "moco", "byol", "barlow_twins", "swav"])
def test_image_ssl(name: str, work: Path, env: dict[str, str]) -> None:
    out = ok(run_readme(name, work, env))
    run = work / "runs" / f"{name}_cifar10"
    metrics = json.loads((run / "metrics.json").read_text())
    knn = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("eval/knn/")}
    assert metrics["step"] == 2 and (knn["n"], knn["n_train"]) == (100, 200), out[-2000:]
    assert (run / "export" / "ssl_config.json").is_file()


@pytest.mark.slow
def test_slip(work: Path, env: dict[str, str]) -> None:
    ok(run_readme("slip_shards", work, env))
    out = ok(run_readme("slip", work, env))
    run = work / "runs" / "slip_cifar10"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2 and "eval/zeroshot/cifar10/acc1" in metrics, out[-2000:]
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_ssl" in x for x in logs), logs
    assert (run / "export" / "open_clip_config.json").is_file()


# ------------------------------------------------------------------ fine-tuning and WiSE-FT
@pytest.mark.slow
def test_finetune_and_wise_ft(work: Path, env: dict[str, str]) -> None:
    """Zero-shot run -> fine-tune from it (model.pretrained) -> one WiSE-FT point -> a sweep."""
    from safetensors.torch import load_file

    if not (work / "shards" / "cifar10_train" / "sizes.json").is_file():  # test_slip's shards
        ok(run_readme("slip_shards", work, env))
    ok(run_readme("clip_cifar10", work, env))
    out = ok(run_readme("finetune", work, env))
    assert "eval/zeroshot/cifar10/acc1=" in out, out[-2000:]
    assert (
        "pretrained: runs/clip_cifar10" in (work / "runs/finetune_cifar10/config.yaml").read_text()
    )
    ok(run_readme("wise_ft", work, env))
    zs, ft, mid = (
        load_file(str(work / "runs" / r / "open_clip_model.safetensors"))
        for r in ("clip_cifar10/export", "finetune_cifar10/export", "wise_ft")
    )
    for k in ("visual.proj", "text_projection", "logit_scale"):
        mean = (zs[k].double() + ft[k].double()) / 2
        assert bool(((mid[k].double() - mean).abs() <= mean.abs() * 2.0**-24).all()), k
    out = ok(run_readme("wise_ft_sweep", work, env))
    res = json.loads((work / "wise_ft_sweep" / "wise_ft.json").read_text())
    assert [p["alpha"] for p in res["points"]] == [0, 0.25, 0.5, 0.75, 1]
    assert all(p["n"] == {"cifar10": 100} for p in res["points"]), res["points"]
    assert (work / "wise_ft_sweep" / "wise_ft.png").is_file() and "| alpha |" in out


# ---------------------------------------------------------------------------------------- SimCSE
@pytest.fixture(scope="module")
def simcse_sup(work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_readme("simcse_sup", work, env)


@pytest.mark.slow
def test_simcse_sup(simcse_sup, work: Path) -> None:
    out = ok(simcse_sup)
    assert "eval/sts/sts-dev/spearman=" in out
    assert (work / "runs" / "simcse_sup" / "export" / "modules.json").is_file()


@pytest.mark.slow
def test_simcse_unsup(work: Path, env: dict[str, str]) -> None:
    out = ok(run_readme("simcse_unsup", work, env))
    assert "eval/sts/sts-dev/spearman=" in out
    assert (work / "runs" / "simcse_unsup" / "export" / "modules.json").is_file()


@pytest.mark.slow
def test_eval_sts(simcse_sup, work: Path, env: dict[str, str]) -> None:
    ok(simcse_sup)
    out = ok(run_readme("eval_sts", work, env))
    res = json.loads((work / "sts.json").read_text())
    assert res["metrics"]["n_pairs"] == {"sts-dev": 64, "sts-test": 64, "sts-train": 64}, res
    assert "sts-test" in out, out[-2000:]


# ------------------------------------------------------------------------- embed, index, serve
@pytest.fixture(scope="module")
def embedded(trained, work: Path, env: dict[str, str]) -> Path:
    _export(work)
    ok(run_readme("embed", work, env))
    return work / "emb"


def test_embed(embedded: Path) -> None:
    report = json.loads((embedded / "embeddings.json").read_text())
    assert report["skipped_shards"] == 0, report
    for modality in ("img_emb", "text_emb"):
        rows = [np.load(p, mmap_mode="r").shape for p in (embedded / modality).glob("*.npy")]
        assert sum(r[0] for r in rows) == 16, (modality, rows)


@pytest.fixture(scope="module")
def indexed(embedded: Path, work: Path, env: dict[str, str]) -> Path:
    ok(run_readme("index", work, env))
    return embedded / "index"


def test_index(indexed: Path) -> None:
    info = json.loads((indexed / "index.json").read_text())
    assert info["ntotal"] == 16, info


@pytest.mark.slow
def test_serve(indexed: Path, embedded: Path, work: Path, env: dict[str, str]) -> None:
    _check_serve("serve", embedded, work, env)


def _check_serve(name: str, embedded: Path, work: Path, env: dict[str, str]) -> None:
    """Start the README's serve command ``name``, query it as a user would, stop it."""
    import httpx

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + shell(name)],
        cwd=work,
        env={**env, "PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a timing assertion
        while True:
            assert proc.poll() is None, f"serve exited {proc.returncode}:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "serve did not answer /health"
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        page = httpx.get(f"{base}/", timeout=30)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        vec = np.load(sorted((embedded / "img_emb").glob("*.npy"))[0])[3].astype(np.float32)
        hits = httpx.post(f"{base}/search", json={"embedding": vec.tolist(), "k": 3}, timeout=60)
        assert hits.status_code == 200, hits.text
        (top, *_), *_ = hits.json()["results"]
        assert top["id"] == 3 and top["score"] > 0.99, top
        text = httpx.post(f"{base}/search", json={"text": "a cake on a table", "k": 5}, timeout=60)
        assert text.status_code == 200 and len(text.json()["results"][0]) == 5, text.text
        img = httpx.get(f"{base}/image/3", timeout=30)
        assert img.status_code == 200 and img.content[:2] == b"\xff\xd8", img.headers
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# ------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported_hf(trained, work: Path, env: dict[str, str]) -> Path:
    _export(work)
    ok(run_readme("export_hf", work, env))
    return work / "exports" / "mine-hf"


def test_export_hf(exported_hf: Path) -> None:
    cfg = json.loads((exported_hf / "config.json").read_text())
    assert cfg["model_type"] == "clip" and (exported_hf / "model.safetensors").is_file()
    card = (exported_hf / "README.md").read_text()
    assert "library_name: transformers" in card and "| data | shards/" in card, card
    assert re.search(r"^\| `eval/zeroshot/[^/]+/acc1` \| 0\.\d{4} \|$", card, flags=re.M), card
    assert shell("export_hf") in card


@pytest.mark.slow
def test_eval_zeroshot_hf_equals_run(exported_hf: Path, zeroshot, work, env) -> None:
    """Issue 16's acceptance: the HF folder scores as the run's export, within 1e-6."""
    ok(run_readme("eval_zeroshot_hf", work, env))
    res = json.loads((work / "cifar10_hf.json").read_text())
    assert res["n_samples"] == zeroshot["n_samples"] == 100
    for k, v in zeroshot["metrics"].items():
        assert abs(res["metrics"][k] - v) <= 1e-6, (k, res["metrics"][k], v)


@pytest.mark.slow
def test_export_onnx_and_serve(indexed: Path, embedded: Path, work: Path, env) -> None:
    ok(run_readme("export_onnx", work, env))
    onnx = work / "exports" / "mine-onnx"
    assert {"image.onnx", "text.onnx", "preprocess.json", "README.md"} <= set(os.listdir(onnx))
    _check_serve("serve_onnx", embedded, work, env)
