"""Evaluation inside the training loop: the ``clipkit eval`` evaluators, through the one driver.

The same :class:`~clipkit.eval.driver.Evaluator` s run here as on the command line, on the same
readers (:mod:`clipkit.eval.datasets`) and the same eval transform, so a set that
``clipkit eval`` reads, training reads too, and the in-training numbers equal the CLI's on the
run's export (fp32). Every rank reads a disjoint slice; the results are gathered, so every rank
returns the same metrics. :func:`check_eval_inputs` opens each configured set at the start of a
run, so a wrong path or class list costs seconds, not a training run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipkit.config.schema import Config
from clipkit.models import DualEncoder

# Samples tried by check_eval_inputs before calling a set unreadable: one bad image at the
# start of a set is skipped by the evaluation too, so it must not stop the run.
_FIRST_SAMPLES = 8


def _dataset_name(cfg: Config, spec: str) -> str:
    from clipkit.eval.driver import dataset_name

    # The built-in demo's test split is a bare shard (".../digits/test/00000.tar").
    if cfg.data.builtin and not cfg.eval.zeroshot and spec:
        return cfg.data.builtin
    return dataset_name(spec)


def _zeroshot_options(cfg: Config) -> Any:
    from clipkit.eval.zeroshot_cli import ZeroShotOptions

    # The built-in demo's test shards carry labels only: its names and templates are built in.
    demo = cfg.data.builtin if cfg.data.builtin and not cfg.eval.zeroshot else ""
    return ZeroShotOptions(
        classnames=cfg.eval.classnames or demo, templates=cfg.eval.templates or demo
    )


def evaluate_clip(
    cfg: Config, model: DualEncoder, accelerator: Any, *, zeroshot_spec: str
) -> dict[str, float]:
    """Zero-shot classification (and retrieval when ``eval.retrieval`` is set) of ``model``.

    Args:
        cfg: the run's config (``eval.*``; ``data.workers`` for the readers).
        model: the unwrapped DualEncoder.
        accelerator: the run's ``accelerate.Accelerator`` (device, rank, world size, gathers).
        zeroshot_spec: the zero-shot set (``eval.zeroshot`` or the built-in demo's test split);
            empty: none.

    Returns:
        A flat dict such as ``{"zeroshot/digits/acc1": 0.93, "zeroshot/digits/n": 360.0,
        "zeroshot/digits/skipped": 0.0, ...}``: the CLI's metrics, the sample count ``n``, the
        other counts and the skip counts.

    Raises:
        ValueError: unreadable data or class names that do not fit it (as ``clipkit eval``).
    """
    from clipkit.eval.driver import evaluate
    from clipkit.eval.retrieval_cli import EVALUATOR as RETRIEVAL
    from clipkit.eval.zeroshot_cli import EVALUATOR as ZEROSHOT

    common = dict(
        batch_size=cfg.eval.batch_size,
        workers=cfg.data.workers,
        accelerator=accelerator,
        device=accelerator.device,
        precision="fp32",  # the CLI's default, so the numbers match `clipkit eval` on the export
    )
    out: dict[str, float] = {}
    if zeroshot_spec:
        name = _dataset_name(cfg, zeroshot_spec)
        rep = evaluate(
            ZEROSHOT, model, zeroshot_spec, _zeroshot_options(cfg), dataset=name, **common
        )
        out.update({f"zeroshot/{name}/{k}": v for k, v in rep.scalars().items()})
    if cfg.eval.retrieval:
        name = _dataset_name(cfg, cfg.eval.retrieval)
        rep = evaluate(RETRIEVAL, model, cfg.eval.retrieval, dataset=name, **common)
        out.update({f"retrieval/{name}/{k}": v for k, v in rep.scalars().items()})
    out.update(evaluate_knn(cfg, model, accelerator))
    return out


def _knn_options(cfg: Config) -> Any:
    from clipkit.eval.knn_cli import KnnOptions

    return KnnOptions(
        train=cfg.eval.knn_train, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature
    )


def evaluate_knn(cfg: Config, model: Any, accelerator: Any) -> dict[str, float]:
    """Weighted kNN (``clipkit eval knn``'s evaluator) of ``model.encode_image`` features.

    Fits on ``eval.knn_train`` and scores ``eval.knn`` (both empty: nothing); every rank
    extracts its slice of both sets, the features are gathered.

    Returns:
        ``{"knn/<set>/acc1": ..., "knn/<set>/acc5": ..., ...}`` (the CLI's metrics and counts).
    """
    if not cfg.eval.knn:
        return {}
    from clipkit.eval.driver import evaluate
    from clipkit.eval.knn_cli import EVALUATOR as KNN

    name = _dataset_name(cfg, cfg.eval.knn)
    rep = evaluate(
        KNN,
        model,
        cfg.eval.knn,
        _knn_options(cfg),
        dataset=name,
        batch_size=cfg.eval.batch_size,
        workers=cfg.data.workers,
        accelerator=accelerator,
        device=accelerator.device,
        precision="fp32",
    )
    return {f"knn/{name}/{k}": v for k, v in rep.scalars().items()}


def check_knn_inputs(cfg: Config, model: Any) -> None:
    """``eval.knn`` and ``eval.knn_train`` come together, open, and name the same classes.

    Raises:
        ValueError: one line naming the key, the path and the problem.
    """
    if not cfg.eval.knn and not cfg.eval.knn_train:
        return
    if not (cfg.eval.knn and cfg.eval.knn_train):
        missing = "eval.knn_train" if cfg.eval.knn else "eval.knn"
        raise ValueError(f"{missing} is empty: kNN needs both eval.knn (TEST) and eval.knn_train")
    from clipkit.eval.train_test import check_class_sets

    for key, spec in (("eval.knn", cfg.eval.knn), ("eval.knn_train", cfg.eval.knn_train)):
        _check_exists(key, spec)
    try:
        check_class_sets(cfg.eval.knn, _knn_options(cfg))
    except ValueError as err:
        raise ValueError(f"eval.knn={cfg.eval.knn}: {err}") from None


# --------------------------------------------------------------------------- start-of-run checks
def _first_readable(batches: Any, key: str, spec: str) -> dict[str, Any]:
    """The first batch (of one sample) with a decoded image, among the first few samples.

    Reads through the public loaders (``{"image", "cls"|"captions", "skipped_keys",
    "skipped_shard_keys"}`` batches), exactly what the evaluation will read.
    """
    tried: list[str] = []
    problems: list[str] = []
    it = iter(batches)
    try:
        for batch in it:
            if batch["image"].shape[0]:
                return batch
            tried += batch.get("skipped_keys", [])
            problems += batch.get("skipped_shard_keys", [])
            if len(tried) >= _FIRST_SAMPLES:
                break
    except ValueError as err:  # e.g. a shard sample without 'cls'
        raise ValueError(f"{key}={spec}: {err}") from None
    finally:
        del it  # stop the reader: the check reads a few samples, not the set
    if tried:
        raise ValueError(
            f"{key}={spec}: no readable image among the first {len(tried)} samples "
            f"(e.g. {tried[0]})"
        )
    raise ValueError(f"{key}={spec}: no samples" + (f" ({problems[0]})" if problems else ""))


def _check_exists(key: str, spec: str) -> None:
    if "{" not in spec and not Path(spec).expanduser().exists():
        raise ValueError(f"{key}={spec}: not found")


def _check_shards(key: str, spec: str, dataset: Any) -> None:
    for shard in getattr(dataset, "shards", []):
        if not Path(shard).is_file():
            raise ValueError(f"{key}={spec}: shard not found: {shard}")


def _check_zeroshot(cfg: Config, model: DualEncoder, spec: str) -> None:
    from clipkit.eval.datasets import labelled_loader, open_labelled
    from clipkit.eval.zeroshot_cli import resolve_prompts

    key = "eval.zeroshot"
    _check_exists(key, spec)
    try:
        ls = open_labelled(spec, model.preprocess_eval)
    except ValueError as err:
        raise ValueError(f"{key}={spec}: {err}") from None
    _check_shards(key, spec, ls.dataset)
    try:
        classnames, _ = resolve_prompts(
            spec, _zeroshot_options(cfg), ls, _dataset_name(cfg, spec), flag="eval.classnames"
        )
    except ValueError as err:
        raise ValueError(f"{key}={spec}: {err}") from None
    first = _first_readable(labelled_loader(ls, batch_size=1), key, spec)
    label = int(first["cls"][0])
    if not 0 <= label < len(classnames):
        raise ValueError(
            f"{key}={spec}: the first sample's label is {label} but eval.classnames="
            f"{cfg.eval.classnames} has {len(classnames)} names"
        )


def _check_retrieval(cfg: Config, model: DualEncoder, spec: str) -> None:
    from clipkit.eval.datasets import caption_loader

    key = "eval.retrieval"
    _check_exists(key, spec)
    try:
        loader = caption_loader(spec, model.preprocess_eval, batch_size=1)
    except ValueError as err:
        raise ValueError(f"{key}={spec}: {err}") from None
    _check_shards(key, spec, loader.dataset)
    _first_readable(loader, key, spec)


def check_eval_inputs(cfg: Config, model: Any) -> None:
    """Fail fast on evaluation inputs that would fail at the end of training.

    Every configured set of the CLIP task (``eval.zeroshot`` or the built-in demo's test split,
    ``eval.retrieval``; SimCSE checks ``eval.sts`` in its own ``check_inputs``) must exist, open
    with the reader that ``clipkit eval`` and the in-training evaluation use, and yield a
    readable first sample
    (within the first few: a single bad image is skipped by the evaluation too); the class names
    (``eval.classnames``, or the data's own when empty) must resolve, and their count must match
    the set's classes (ImageFolder folders, CLIP_benchmark's classnames.txt) or, for ``cls``
    shards, cover the first sample's label; the templates must load. Cost: opening the sets and
    decoding a sample or two, seconds at most (an ImageFolder tar's headers are scanned).

    Args:
        cfg: the run's config.
        model: the model being trained (a DualEncoder for ``task=clip``; its eval transform
            decodes the probe sample).

    Raises:
        ValueError: one line naming the key, the path and the problem, e.g.
            ``eval.zeroshot=/x/y.tar: not found``.

    Example:
        >>> check_eval_inputs(cfg, model)  # at the start of train(cfg), before any step
    """
    from clipkit.train.clip_task import resolve_data

    _, zs_spec = resolve_data(cfg)
    if zs_spec:
        _check_zeroshot(cfg, model, zs_spec)
    if cfg.eval.retrieval:
        _check_retrieval(cfg, model, cfg.eval.retrieval)
    check_knn_inputs(cfg, model)
