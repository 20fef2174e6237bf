"""SimCSETask: embedding layout, a real run of the shared loop, 2-process gradient parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from simcse_helpers import tiny_bert, write_sts

from clipkit.config import load_config
from clipkit.train.simcse_task import SimCSETask

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("simcse_dist_worker.py")
WORDS = [
    "red",
    "blue",
    "green",
    "car",
    "boat",
    "house",
    "dog",
    "cat",
    "runs",
    "sleeps",
    "big",
    "small",
    "old",
    "new",
]


def _sentence(i: int) -> str:
    return " ".join(WORDS[(i * p) % len(WORDS)] for p in (1, 3, 5, 7))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("simcse")
    (d / "unsup.txt").write_text("\n".join(f"{_sentence(i)} {i}" for i in range(48)) + "\n")
    rows = [f"{_sentence(i)},{_sentence(i + 1)},{_sentence(i + 7)} no" for i in range(48)]
    (d / "sup.csv").write_text("sent0,sent1,hard_neg\n" + "\n".join(rows) + "\n")
    sts = [(float(i % 6), _sentence(i), _sentence(i + i % 3)) for i in range(12)]
    write_sts(d / "sts-dev.csv", sts)
    return {
        "dir": d,
        "bert": tiny_bert(d / "bert", dropout=0.1),
        "bert0": tiny_bert(d / "bert0", dropout=0.0),
        "unsup": d / "unsup.txt",
        "sup": d / "sup.csv",
        "sts": d / "sts-dev.csv",
    }


def _cfg(files, name: str, *extra: str):
    return load_config(
        REPO / "configs" / f"simcse_{name}.yaml",
        [
            f"model.hf_text_model={files['bert']}",
            f"data.train={files[name]}",
            f"eval.sts={files['sts']}",
            f"train.output_dir={files['dir'] / 'run'}",
            "train.batch_size=8",
            "simcse.max_length=16",
            *extra,
        ],
    )


def test_embed_layout_and_dropout_views(files):
    task = SimCSETask()
    cfg = _cfg(files, "unsup")
    model = task.build_model(cfg)
    data = task.build_train_data(cfg, model, 0, 1)
    batch = next(iter(data))
    assert batch["input_ids"].shape[0] == 16 and len(batch["key"]) == 8
    model.train()
    e = task.embed(model, batch)
    q, k = e.q, e.k
    assert q.shape == k.shape == (8, 32) and e.hard_negatives is None
    assert not torch.allclose(q, k)  # two dropout masks
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(8))
    model.eval()
    e = task.embed(model, batch)
    torch.testing.assert_close(e.q, e.k)  # same sentences, no dropout
    sup = _cfg(files, "sup", "simcse.mine_negatives=2")
    sdata = task.build_train_data(sup, model, 0, 1)
    assert sdata.stats["mined"] == 2 * 48
    hn = task.embed(model, next(iter(sdata))).hard_negatives
    assert hn.shape == (8 * 3, 32)  # the CSV's hard negative + 2 mined


@pytest.mark.slow
def test_shared_loop_run_exports_sentence_transformers(files, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from clipkit.models.sentence_encoder import SentenceEncoder, resolve_model_path
    from clipkit.train.loop import train

    out = tmp_path / "run"
    cfg = _cfg(
        files,
        "sup",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "eval.every=2",
        "train.accum_steps=2",
        "train.trackers=[]",
        "optim.cooldown_steps=4",
        "train.batch_size=4",
        "simcse.mine_negatives=1",
    )
    result = train(cfg)
    assert "eval/sts/sts-dev/spearman" in result and (out / "sts_dev.png").stat().st_size > 0
    history = [json.loads(x) for x in (out / "sts_eval.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 2, 4]  # 0 = the model before training
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["value"] == max(h["sts/main"] for h in history)
    assert resolve_model_path(str(out)) == str(out / "best")  # a run folder means its best/
    sentences = [_sentence(i) for i in range(5)]
    ours = SentenceEncoder.from_pretrained(str(out / "export")).encode(sentences)
    ref = st.SentenceTransformer(str(out / "export"), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)


def _grads(tmp_path: Path, files, nproc: int, accum: int, torchrun=None) -> dict:
    out = tmp_path / f"g{nproc}_{accum}.pt"
    if nproc == 1:  # no launcher needed: saves a process start on 2 busy cores
        from simcse_dist_worker import main

        main(str(out), str(files["bert0"]), str(files["sup"]), 16, accum)
        return torch.load(out)
    torchrun(
        WORKER, out, files["bert0"], files["sup"], 16, accum,
        nproc=nproc, env={"HF_HUB_OFFLINE": "1"}, cwd=REPO,
    )  # fmt: skip
    return torch.load(out)


@pytest.mark.slow
def test_two_processes_equal_one(files, tmp_path, torchrun):
    # Dropout off (bert0): masks cannot match across different batch splits.
    one = _grads(tmp_path, files, 1, 1)
    two = _grads(tmp_path, files, 2, 1, torchrun)
    two_acc = _grads(tmp_path, files, 2, 2, torchrun)  # 2 processes x 2 GradCache micro-batches
    assert one.keys() == two.keys() and len(one) > 10
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(two_acc[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_missing_or_unreadable_sts_set_fails_at_start(tmp_path):
    """``eval.sts`` is read in check_inputs (before the encoder loads or any step runs)."""
    task = SimCSETask()
    missing = tmp_path / "nope" / "sts-dev.csv"
    cfg = load_config(None, ["task=simcse", f"eval.sts={missing}"])
    with pytest.raises(ValueError) as info:
        task.check_inputs(cfg, None)
    msg = str(info.value)
    assert msg.startswith(f"eval.sts={missing}: ") and len(msg.splitlines()) == 1, msg
    garbage = tmp_path / "sts.csv"
    garbage.write_text("just one column\nand no scores\n")
    cfg = load_config(None, ["task=simcse", f"eval.sts={garbage}"])
    with pytest.raises(ValueError, match=f"eval.sts={garbage}: "):
        task.check_inputs(cfg, None)


def test_moved_simcse_keys_say_where_they_went():
    from clipkit.config import ConfigError

    with pytest.raises(ConfigError, match="'model.pooling' is now 'simcse.pooling'"):
        load_config(None, ["model.pooling=cls"])
    assert load_config(None, ["simcse.mine_negatives=2"]).simcse.mine_negatives == 2
