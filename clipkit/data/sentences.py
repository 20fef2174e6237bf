"""SimCSE training data: sentence rows -> deterministic, resumable, rank-sharded micro-batches.

Two formats (Gao, Yao, Chen 2021):

- unsupervised: a text file, one sentence per line; the sentence is its own positive (the two
  views differ only by dropout);
- supervised: a CSV with header ``sent0,sent1[,hard_neg]`` (anchor, entailed hypothesis,
  contradiction as hard negative).

Each epoch's order is a permutation drawn from ``(seed, epoch)``; global batch ``b`` is rows
``perm[b*G : (b+1)*G]`` with ``G = batch_size * world_size``, and rank ``r`` takes its ``r``-th
slice, so ``W`` processes with batch ``B`` see exactly the rows one process with ``W*B`` sees.
The last incomplete global batch is dropped.

A micro-batch is ``{"input_ids": (c*B, L), "attention_mask": (c*B, L), "key": [B row ids]}``:
the ``c`` columns (anchor, positive, ``h`` negatives) stacked column by column and tokenised
together, so the encoder runs one forward per micro-batch (different dropout for every row).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class SentenceRows:
    """Rows of SimCSE data: anchors, positives (None = unsupervised) and ``h`` negatives per row."""

    anchors: list[str]
    positives: list[str] | None = None
    negatives: list[list[str]] = field(default_factory=list)  # h columns, each of len(anchors)

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def columns(self) -> list[list[str]]:
        """Anchor, positive (the anchor again when unsupervised), then negative columns."""
        return [self.anchors, self.positives or self.anchors, *self.negatives]


def read_sentences(path: str | Path) -> SentenceRows:
    """Read unsupervised (``.txt``) or supervised (``.csv``: ``sent0,sent1[,hard_neg]``) data.

    Raises:
        FileNotFoundError: missing file.
        ValueError: empty data, a bad header or a row with an empty/missing field (file:line).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.train not found: {p}")
    if p.suffix.lower() == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or header[:2] != ["sent0", "sent1"] or len(header) > 3:
                raise ValueError(f"{p}: header must be 'sent0,sent1[,hard_neg]', got {header}")
            rows = []
            for i, row in enumerate(reader, 2):
                if len(row) != len(header) or not all(x.strip() for x in row):
                    raise ValueError(f"{p}:{i}: expected {len(header)} non-empty fields, got {row}")
                rows.append(row)
        if not rows:
            raise ValueError(f"{p}: no data rows")
        negatives = [[r[2] for r in rows]] if len(header) == 3 else []
        return SentenceRows([r[0] for r in rows], [r[1] for r in rows], negatives)
    # Split on "\n" only: str.splitlines() would also break at U+2028 and friends inside a line.
    lines = [x.strip() for x in p.read_text(encoding="utf-8").split("\n")]
    anchors = [x for x in lines if x]
    if not anchors:
        raise ValueError(f"{p}: no sentences (expected one per line)")
    return SentenceRows(anchors)


def mine_hard_negatives(
    rows: SentenceRows,
    encode: Callable[[list[str]], torch.Tensor],
    k: int,
    max_sim: float,
    seed: int = 0,
    block: int = 1024,
) -> tuple[SentenceRows, dict[str, int]]:
    """Add ``k`` mined negative columns: each anchor's nearest pool sentences below a ceiling.

    The pool is every distinct positive and existing negative. For anchor ``i`` the candidates
    exclude its own anchor and positive text; a candidate whose cosine similarity to the anchor
    exceeds ``max_sim`` is treated as a likely false negative (a paraphrase) and skipped. An
    anchor with fewer than ``k`` candidates under the ceiling gets random pool sentences instead
    (counted in ``stats["fallback"]``).

    Args:
        rows: the data; ``encode: list[str] -> (n, D)`` the current encoder.
        k: negatives to mine per anchor (>= 1).
        max_sim: cosine similarity ceiling in (-1, 1].
        seed: seed of the fallback draw.
        block: anchors scored per matrix product (memory: ``block x pool``).

    Returns:
        ``(rows with k more negative columns, stats)``.

    Raises:
        ValueError: bad ``k``/``max_sim`` or a pool too small.
    """
    if k < 1:
        raise ValueError(f"simcse.mine_negatives must be >= 1 to mine, got {k}")
    if not -1.0 < max_sim <= 1.0:
        raise ValueError(f"simcse.mine_max_sim must be in (-1, 1], got {max_sim}")
    pool = list(dict.fromkeys((rows.positives or rows.anchors) + sum(rows.negatives, [])))
    if len(pool) <= k:
        raise ValueError(f"cannot mine {k} negatives from a pool of {len(pool)} sentences")
    where = {s: i for i, s in enumerate(pool)}
    pool_emb = torch.nn.functional.normalize(encode(pool).float(), dim=-1)  # (P, D)
    anchors = list(dict.fromkeys(rows.anchors))
    a_index = {s: i for i, s in enumerate(anchors)}
    anc_emb = torch.nn.functional.normalize(encode(anchors).float(), dim=-1)  # (A, D)
    positives = rows.positives or rows.anchors
    gen = torch.Generator().manual_seed(seed)
    mined: list[list[str]] = [[] for _ in range(k)]
    fallback = 0
    for start in range(0, len(rows), block):
        idx = range(start, min(start + block, len(rows)))
        sims = anc_emb[[a_index[rows.anchors[i]] for i in idx]] @ pool_emb.T  # (b, P)
        for r, i in enumerate(idx):
            for text in (rows.anchors[i], positives[i]):
                if text in where:
                    sims[r, where[text]] = -float("inf")
        sims[sims > max_sim] = -float("inf")
        top_vals, top_idx = sims.topk(k, dim=1)  # (b, k)
        for r in range(len(idx)):
            for j in range(k):
                choice = int(top_idx[r, j])
                if top_vals[r, j] == -float("inf"):
                    fallback += 1
                    choice = int(torch.randint(len(pool), (1,), generator=gen))
                mined[j].append(pool[choice])
    out = SentenceRows(rows.anchors, rows.positives, rows.negatives + mined)
    return out, {"mined": k * len(rows), "fallback": fallback}


class SentenceBatches:
    """Iterable of tokenised micro-batches with exact resume (see the module docstring).

    Args:
        rows: the data.
        tokenize: ``list[str] -> {"input_ids": (n, L), "attention_mask": (n, L)}``.
        batch_size: rows per micro-batch on this rank.
        seed: order seed; epoch ``e`` uses the permutation of ``(seed, e)``.
        rank, world_size: this process's slice of each global batch.

    Raises:
        ValueError: bad batch size or rank.
    """

    def __init__(
        self,
        rows: SentenceRows,
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.rows = rows
        self.tokenize = tokenize
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out
        self.num_batches = len(rows) // (batch_size * world_size)
        self.stats: dict[str, int] = {"rows": len(rows), "columns": len(rows.columns)}

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position"}``: where the next batch comes from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved ``state_dict``."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=gen)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        perm = self._order()
        g, b = self.batch_size * self.world_size, self.batch_size
        cols = self.rows.columns
        while self.position < self.num_batches:
            start = self.position * g + self.rank * b
            idx = perm[start : start + b].tolist()
            texts = [col[i] for col in cols for i in idx]  # column-major: (c*B,)
            batch: dict[str, Any] = dict(self.tokenize(texts))
            batch["key"] = [str(i) for i in idx]
            self.position += 1
            yield batch


__all__ = ["SentenceBatches", "SentenceRows", "mine_hard_negatives", "read_sentences"]
