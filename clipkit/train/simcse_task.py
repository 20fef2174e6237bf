"""The SimCSE task: sentence rows -> SentenceEncoder -> one-directional InfoNCE, T = 0.05.

Unsupervised SimCSE (Gao, Yao, Chen 2021) encodes each sentence twice in one forward, so the
two views differ by their dropout masks; supervised SimCSE uses NLI (premise, entailment) pairs
with the contradiction as a hard negative. Both are :func:`clipkit.losses.info_nce` with the
loss module's fixed temperature (``loss.learnable_temperature=false``, ``loss.symmetric=false``).

Evaluation is STS Spearman x 100 on ``eval.sts`` (STS-B dev in the shipped configs); each time
it improves, ``<output_dir>/best`` receives the model (sentence-transformers format), and
``<output_dir>/sts_dev.png`` plots the score over steps (history in ``sts_eval.jsonl``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipkit.config.schema import Config
from clipkit.data.sentences import SentenceBatches
from clipkit.models.sentence_encoder import SentenceEncoder
from clipkit.train.task import Embeddings, Task


def _unwrap(model: nn.Module) -> SentenceEncoder:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def distributed_encode(
    model: SentenceEncoder, sentences: list[str], accelerator: Any, batch_size: int
) -> torch.Tensor:
    """Encode ``sentences`` split over the ranks; every rank gets all ``(N, D)`` embeddings."""
    w, r = accelerator.num_processes, accelerator.process_index
    if w == 1:
        return model.encode(sentences, batch_size=batch_size)
    chunk = math.ceil(len(sentences) / w)
    local = model.encode(sentences[r * chunk : (r + 1) * chunk], batch_size=batch_size)
    padded = torch.zeros(chunk, model.embed_dim)
    padded[: local.shape[0]] = local  # (chunk, D): equal shapes for the gather
    gathered = accelerator.gather(padded.to(accelerator.device))  # (w * chunk, D)
    return gathered[: len(sentences)].cpu()


def plot_history(history: list[dict[str, float]], key: str, path: Path) -> None:
    """Write a PNG of ``key`` over ``step`` (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([h["step"] for h in history], [h[key] for h in history], marker="o")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"{key} (Spearman x 100)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SimCSETask(Task):
    """Unsupervised (``.txt``) or supervised (``.csv``) SimCSE; see the module docstring."""

    def __init__(self) -> None:
        self._sets: list[Any] | None = None

    # --------------------------------------------------------------- model and data
    def build_model(self, cfg: Config) -> nn.Module:
        """Encoder ``model.hf_text_model`` ("" = packaged MiniLM) with ``simcse.pooling``."""
        sc = cfg.simcse
        if sc.max_length < 2:
            raise ValueError(f"simcse.max_length must be >= 2, got {sc.max_length}")
        if sc.mlp_train_only and sc.pooling != "cls_mlp":
            raise ValueError(
                f"simcse.mlp_train_only=true needs simcse.pooling=cls_mlp, got '{sc.pooling}'"
            )
        return SentenceEncoder.from_pretrained(
            cfg.model.hf_text_model, pooling=sc.pooling, mlp_train_only=sc.mlp_train_only
        )

    def check_inputs(self, cfg: Config, model: nn.Module) -> None:
        """``eval.sts`` loads (read once here and kept for every evaluation)."""
        if cfg.eval.sts:
            from clipkit.eval.sts import load_sts

            try:
                self._sets = load_sts(cfg.eval.sts)
            except (OSError, ValueError) as err:
                raise ValueError(f"eval.sts={cfg.eval.sts}: {err}") from None

    def build_train_data(
        self, cfg: Config, model: nn.Module, rank: int, world_size: int
    ) -> SentenceBatches:
        """Batches of ``data.train`` (optionally with mined hard negatives), sharded by rank."""
        from clipkit.data.sentences import mine_hard_negatives, read_sentences

        if not cfg.data.train:
            raise ValueError("data.train is empty: give a .txt (unsupervised) or .csv (supervised)")
        m = _unwrap(model)
        rows = read_sentences(cfg.data.train)
        stats: dict[str, int] = {}
        if cfg.simcse.mine_negatives > 0:
            # Every rank mines the same negatives (same weights, deterministic): no exchange.
            rows, stats = mine_hard_negatives(
                rows,
                lambda s: m.encode(s, batch_size=cfg.eval.batch_size, progress=rank == 0),
                cfg.simcse.mine_negatives,
                cfg.simcse.mine_max_sim,
                seed=cfg.train.seed,
            )
        data = SentenceBatches(
            rows,
            lambda texts: m.tokenize(texts, max_length=cfg.simcse.max_length),
            cfg.train.batch_size,
            seed=cfg.train.seed,
            rank=rank,
            world_size=world_size,
        )
        data.stats.update(stats)
        if not cfg.train.resume and rank == 0:  # a fresh run: forget an earlier run's records
            run_dir = Path(cfg.train.output_dir).expanduser().resolve()
            for old in (run_dir / "sts_eval.jsonl", run_dir / "best" / "best.json"):
                old.unlink(missing_ok=True)
        if cfg.eval.sts and cfg.eval.every > 0 and not cfg.train.resume and rank == 0:
            # The untrained model's score: step 0 of the plot and the baseline for best/.
            from clipkit.eval.sts import load_sts, sts_scores

            self._sets = self._sets or load_sts(cfg.eval.sts)
            res = sts_scores(lambda s: m.encode(s, batch_size=cfg.eval.batch_size), self._sets)
            self._record(cfg, m, 0, *self._summarise(res))
        return data

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Embeddings:
        """One forward over all columns; split into anchors, positives and hard negatives."""
        n = len(batch["key"])
        z = model(batch["input_ids"], batch["attention_mask"])  # (c*n, D), normalised
        hard = z[2 * n :] if z.shape[0] > 2 * n else None  # (h*n, D)
        return Embeddings(q=z[:n], k=z[n : 2 * n], hard_negatives=hard)

    def logit_scale(self, model: nn.Module) -> torch.Tensor | None:
        """None: the loss module's fixed temperature (``loss.temperature``) is used."""
        return None

    # --------------------------------------------------------------- evaluation
    def evaluate(
        self, cfg: Config, model: nn.Module, accelerator: Any, step: int
    ) -> dict[str, float]:
        """STS Spearman x 100 on ``eval.sts``; keeps ``<output_dir>/best`` and the plot."""
        from clipkit.eval.sts import load_sts, sts_scores

        if not cfg.eval.sts:
            return {}
        if self._sets is None:
            self._sets = load_sts(cfg.eval.sts)
        m = _unwrap(model)
        res = sts_scores(
            lambda s: distributed_encode(m, s, accelerator, cfg.eval.batch_size), self._sets
        )
        main_value, metrics = self._summarise(res)
        if accelerator.is_main_process:
            self._record(cfg, m, step, main_value, metrics)
        return metrics

    @staticmethod
    def _summarise(res: dict[str, Any]) -> tuple[float, dict[str, float]]:
        metrics = {f"sts/{k}/spearman": float(v) for k, v in res["spearman"].items()}
        if len(res["spearman"]) > 1:
            metrics.update({f"sts/{k}": float(res[k]) for k in ("all", "mean", "wmean")})
        # Model selection as SimCSE: one set -> its score; several -> their mean.
        values = list(res["spearman"].values())
        main_value = float(values[0] if len(values) == 1 else res["mean"])
        metrics["sts/main"] = main_value
        return main_value, metrics

    def _record(
        self, cfg: Config, m: SentenceEncoder, step: int, value: float, metrics: dict
    ) -> None:
        run_dir = Path(cfg.train.output_dir).expanduser().resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "sts_eval.jsonl"
        with log.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        by_step: dict[int, dict] = {}
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] <= step:  # entries past a resumed step are stale
                by_step[rec["step"]] = rec
        history = [by_step[s] for s in sorted(by_step)]
        plot_history(history, "sts/main", run_dir / "sts_dev.png")
        best_file = run_dir / "best" / "best.json"
        best = json.loads(best_file.read_text())["value"] if best_file.is_file() else -math.inf
        if value > best:
            m.save_sentence_transformers(run_dir / "best")
            best_file.write_text(json.dumps({"step": step, "value": value, **metrics}, indent=1))

    def export(self, cfg: Config, model: nn.Module, out_dir: str) -> None:
        """Write the final model as a sentence-transformers folder (``best/`` has the best)."""
        _unwrap(model).save_sentence_transformers(out_dir)


__all__ = ["SimCSETask", "distributed_encode", "plot_history"]
