"""SLIP (task=clip, loss.ssl_weight > 0): one loader pass with caption crop + views, GradCache
exactness with the SSL head, an end-to-end CPU run on real CIFAR-10 caption shards (zero-shot,
kNN, checkpoint, an export ``clipkit eval zeroshot`` loads), and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from cifar_cuts import cut_imagefolder_tar
from safetensors.torch import load_file

from clipkit.config.schema import Config, DataConfig, LossConfig, ModelConfig, SSLConfig
from clipkit.data import build_train_loader
from clipkit.data.views import ViewSpec
from clipkit.losses import build_loss
from clipkit.models import build_dual_encoder
from clipkit.train.cli import main
from clipkit.train.clip_task import ClipTask
from clipkit.train.step import step_gradients

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# --------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def cifar(data_root, tmp_path_factory) -> dict[str, Path | str]:
    """80 train images as 4 caption shards (class name = caption, as bench/train.py builds
    them), the same 80 as an ImageFolder tar (kNN), and 30 test images."""
    from data_tools.build_shards import build

    root = tmp_path_factory.mktemp("slip_cifar")
    train_tar = cut_imagefolder_tar(data_root / "cifar10" / "train.tar", root / "train.tar", 8)
    build(train_tar, root / "shards", shard_size=20, workers=1, progress=False)
    return {
        "shards": str(root / "shards" / "{00000..00003}.tar"),
        "train": train_tar,
        "test": cut_imagefolder_tar(data_root / "cifar10" / "test.tar", root / "test.tar", 3),
    }


def _tokens(texts: list[str]) -> torch.Tensor:
    """A stand-in tokenizer: (B, 2) ids that identify the caption."""
    return torch.tensor([[len(t), sum(map(ord, t))] for t in texts])


def _loader(spec: str, *, text: bool, views: bool, workers: int = 0):
    return build_train_loader(
        DataConfig(train=spec, workers=workers, shuffle_buffer=16),
        tokenizer=_tokens if text else None,
        image_size=32,
        mean=MEAN,
        std=STD,
        batch_size=8,
        seed=3,
        views=ViewSpec("simclr", 2) if views else None,
    )


def test_one_pass_yields_caption_crop_tokens_and_views(cifar):
    """SLIP's batches are exactly the caption loader's batches plus the views loader's views."""
    slip = list(_loader(cifar["shards"], text=True, views=True))
    clip = list(_loader(cifar["shards"], text=True, views=False))
    ssl = list(_loader(cifar["shards"], text=False, views=True))
    assert len(slip) == len(clip) == len(ssl) == 10
    for a, b, c in zip(slip, clip, ssl):
        assert set(a) == {"image", "text", "views", "key", "cls"}
        assert a["image"].shape == (8, 3, 32, 32) and a["image"].dtype == torch.uint8
        assert a["views"].shape == (2, 8, 3, 32, 32) and a["views"].dtype == torch.uint8
        assert a["key"] == b["key"] == c["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
        assert torch.equal(a["views"], c["views"]) and torch.equal(a["cls"], b["cls"])
    # The crop and the views are different pixels of the same image.
    assert not torch.equal(slip[0]["views"][0], slip[0]["image"])


def test_resume_mid_epoch_is_exact(cifar):
    full = list(_loader(cifar["shards"], text=True, views=True, workers=2))
    first = _loader(cifar["shards"], text=True, views=True, workers=2)
    head = []
    for b in first:
        head.append(b)
        if len(head) == 3:
            break
    resumed = _loader(cifar["shards"], text=True, views=True, workers=2)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(0)
    got = head + list(resumed)
    assert [b["key"] for b in got] == [b["key"] for b in full]
    for a, b in zip(got, full):
        for k in ("image", "text", "views"):
            assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- GradCache
def _task(tmp_path: Path, head: str):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    cfg = Config(
        model=ModelConfig(name=str(path)),
        loss=LossConfig(ssl_weight=0.5, ssl_temperature=0.2, chunk_size=8),
        ssl=SSLConfig(head=head, proj_hidden=16, proj_dim=8),
    )
    torch.manual_seed(0)
    task = ClipTask()
    model = task.build_model(cfg).double().train()
    return task, model, build_loss(cfg.loss).double()


def _embed(task, model):
    """The loop's embed: the task's Embeddings as GradCache's dict ("extra/<name>")."""

    def fn(mb):
        e = task.embed(model, mb)
        extra = {f"extra/{n}": t for n, t in e.extra.items()}
        return {"q": e.q, "k": e.k, "logit_scale": e.logit_scale, **extra}

    return fn


def _loss(loss_fn):
    def fn(e):
        extra = {n.removeprefix("extra/"): t for n, t in e.items() if n.startswith("extra/")}
        return loss_fn(e["q"], e["k"], logit_scale=e["logit_scale"], extra=extra)

    return fn


def _batch(n: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64),
        "text": torch.randint(1, 49000, (n, 8), generator=g),
        "views": torch.randn(2, n, 3, 16, 16, generator=g, dtype=torch.float64),
    }


def _split(batch, sizes):
    out, start = [], 0
    for s in sizes:
        sl = slice(start, start + s)
        out.append({"image": batch["image"][sl], "text": batch["text"][sl],
                    "views": batch["views"][:, sl]})  # fmt: skip
        start += s
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("head", ["moco_v2", "slip"])
def test_gradcache_equals_the_whole_batch(tmp_path, head):
    """accum 2 (GradCache, unequal micro-batches) vs the whole batch, float64, every gradient
    (towers, scale, SSL head) norm-wise <= 1e-10. The BN-free head compares with ONE micro-batch
    of all rows; SLIP's BN head normalises per forward, so its reference takes the same two
    forwards' embeddings into one loss (what GradCache claims: the gradient of that loss)."""
    acc = Accelerator(cpu=True)
    task, model, loss_fn = _task(tmp_path, head)
    ref_task, ref, ref_loss_fn = _task(tmp_path, head)
    batch = _batch()
    micro = _split(batch, [10, 14])
    if head == "moco_v2":
        ref_loss, finite = step_gradients(
            [batch], _embed(ref_task, ref), _loss(ref_loss_fn), acc, ref
        )
        assert finite
    else:
        outs = [_embed(ref_task, ref)(mb) for mb in micro]
        full = {n: torch.cat([o[n] for o in outs]) for n in outs[0] if n != "logit_scale"}
        ref_loss = _loss(ref_loss_fn)({**full, "logit_scale": outs[0]["logit_scale"]})
        ref_loss.backward()
    loss, finite = step_gradients(micro, _embed(task, model), _loss(loss_fn), acc, model)
    assert finite
    assert abs(loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    g, g_ref = _grads(model), _grads(ref)
    assert g.keys() == g_ref.keys()
    assert "clip.logit_scale" in g and any(n.startswith("ssl_head.") for n in g)
    errors = {n: _rel(g[n], g_ref[n]) for n in g_ref}
    assert max(errors.values()) <= 1e-10, max(errors.items(), key=lambda kv: kv[1])


def test_view_features_are_the_trunk_before_the_projection(tmp_path):
    """image_trunk(x) @ proj is the tower's own output: the head sits where SLIP puts it."""
    _, model, _ = _task(tmp_path, "slip")
    x = _batch(4)["image"]
    torch.testing.assert_close(
        model.image_trunk(x) @ model.clip.visual.proj, model.clip.encode_image(x)
    )


def test_towers_without_separable_trunk_features_are_refused(tmp_path):
    rn = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    }  # fmt: skip
    path = tmp_path / "rn.json"
    path.write_text(json.dumps(rn))
    with pytest.raises(ValueError, match="not from a ModifiedResNet tower"):
        build_dual_encoder(ModelConfig(name=str(path)), LossConfig(ssl_weight=1.0), SSLConfig())


# --------------------------------------------------------------------------- end to end
def _args(cifar, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "slip_cifar10.yaml"),
        f"data.train={cifar['shards']}", "data.workers=0",
        f"eval.zeroshot={cifar['test']}", f"eval.knn={cifar['test']}",
        f"eval.knn_train={cifar['train']}", "eval.knn_k=5", "eval.every=0",
        f"train.output_dir={out}", "train.batch_size=16", "train.trackers=[]",
        "train.log_every=1", "train.torch_threads=2", "optim.warmup_steps=1",
        "ssl.proj_hidden=64", "ssl.proj_dim=32", *extra,
    ]  # fmt: skip


def test_runs_end_to_end_with_zeroshot_knn_checkpoint_and_export(cifar, tmp_path):
    run = tmp_path / "slip"
    assert main(_args(cifar, run, "train.max_steps=3", "train.accum_steps=2")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 3
    zs = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("eval/zeroshot/")}
    knn = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("eval/knn/")}
    assert zs["n"] == knn["n"] == 30 and knn["n_train"] == 80
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "train/loss" in x]
    assert len(steps) == 3
    for x in steps:  # both parts logged; the total is clip + 1.0 x ssl (fp32)
        total = x["train/loss_clip"] + 1.0 * x["train/loss_ssl"]
        assert abs(x["train/loss"] - total) <= 1e-5 * abs(total)
        assert x["train/loss_ssl"] > 0 and x["train/loss_clip"] > 0
    # The checkpoint carries the SSL head; the open_clip export does not.
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    state = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("ssl_head.") for k in state)
    export = load_file(str(run / "export" / "open_clip_model.safetensors"))
    assert export and not any("ssl_head" in k for k in export)
    from clipkit.models.load import load_model

    model, _ = load_model(str(ckpt))  # a checkpoint folder rebuilds the head from config.yaml
    torch.testing.assert_close(model.ssl_head[0].weight, state["ssl_head.0.weight"])
    # `clipkit eval zeroshot` loads the export and scores what training scored at the end.
    from clipkit.cli import main as cli

    out = tmp_path / "zs.json"
    rc = cli(["eval", "zeroshot", "--model", str(run), "--data", str(cifar["test"]),
              "--classnames", "cifar10", "--templates", "cifar10", "--workers", "0",
              "--output", str(out)])  # fmt: skip
    assert rc == 0
    got = json.loads(out.read_text())["metrics"]
    assert abs(got["acc1"] - zs["acc1"]) <= 1 / 30 + 1e-9


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.ssl_weight=-1", "loss.ssl_weight=-1.0: must be >= 0"),
        ("ssl.views=3", "ssl.views=3: SLIP (loss.ssl_weight > 0) takes exactly 2 views"),
        ("ssl.views=1", "ssl.views=1: SLIP"),
        ("loss.ssl_temperature=0", "loss.ssl_temperature=0.0: must be > 0"),
        ("loss.name=nt_xent", "loss.name=nt_xent: SLIP (loss.ssl_weight > 0) wraps infonce"),
        ("ssl.head=moco_v3", "ssl.head=moco_v3: task=clip with loss.ssl_weight > 0 (SLIP) takes"),
        ("ssl.recipe=nope", "unknown view recipe 'nope'"),
    ],
)
def test_bad_settings_are_one_line_exit_2(cifar, tmp_path, capsys, override, needle):
    rc = main(_args(cifar, tmp_path / "bad", "train.max_steps=1", override))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad" / "checkpoints").exists()
