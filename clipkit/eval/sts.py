"""Semantic textual similarity: Spearman x 100 of cosine similarity against gold scores.

Readers for the three layouts met in practice, each giving :class:`StsSet` objects:

- STS Benchmark (``sts-{train,dev,test}.csv``): tab-separated ``genre, file, year, id, score,
  sentence1, sentence2[, ...]``, no header, no quoting.
- SICK (``SICK_*.txt``): tab-separated with header ``pair_ID sentence_A sentence_B
  relatedness_score ...``; one set per file (SICK-R uses ``relatedness_score``).
- SentEval STS12-16 (``STS.input.<set>.txt`` + ``STS.gs.<set>.txt``): sentence pairs and gold
  scores line by line; pairs whose gold line is empty are unscored and dropped (as SentEval does).

:func:`sts_scores` aggregates like SentEval's ``STSEval``: ``all`` is the Spearman of all sets'
pairs pooled, ``mean`` the plain average of the per-set values, ``wmean`` the average weighted
by the number of pairs.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class StsSet:
    """One scored set of sentence pairs."""

    name: str
    sentences1: list[str]
    sentences2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)


def _float(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{where}: gold score {value!r} is not a number") from None


def read_stsb(path: str | Path) -> StsSet:
    """Read an STS Benchmark CSV (tab-separated, score in column 5, sentences in 6-7)."""
    p = Path(path)
    s1, s2, scores = [], [], []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 7:
                raise ValueError(f"{p}:{i}: expected >= 7 tab-separated fields, got {len(cols)}")
            scores.append(_float(cols[4], f"{p}:{i}"))
            s1.append(cols[5])
            s2.append(cols[6])
    return StsSet(p.stem, s1, s2, scores)


def read_sick(path: str | Path) -> StsSet:
    """Read a SICK file (header ``pair_ID sentence_A sentence_B relatedness_score ...``)."""
    p = Path(path)
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        need = {"sentence_A", "sentence_B", "relatedness_score"}
        missing = need - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{p}: SICK header lacks {', '.join(sorted(missing))}")
        rows = list(reader)
    scores = [_float(r["relatedness_score"], f"{p}:{i + 2}") for i, r in enumerate(rows)]
    return StsSet(p.stem, [r["sentence_A"] for r in rows], [r["sentence_B"] for r in rows], scores)


def read_senteval(input_path: str | Path, gs_path: str | Path) -> StsSet:
    """Read a SentEval pair ``STS.input.<set>.txt`` + ``STS.gs.<set>.txt``; drop unscored pairs."""
    pi, pg = Path(input_path), Path(gs_path)
    pairs = pi.read_text(encoding="utf-8").splitlines()
    gold = pg.read_text(encoding="utf-8").splitlines()
    if len(pairs) != len(gold):
        raise ValueError(f"{pi} has {len(pairs)} lines but {pg} has {len(gold)}")
    s1, s2, scores = [], [], []
    for i, (pair, g) in enumerate(zip(pairs, gold), 1):
        if not g.strip():
            continue  # unscored pair
        cols = pair.split("\t")
        if len(cols) < 2:
            raise ValueError(f"{pi}:{i}: expected 2 tab-separated sentences")
        s1.append(cols[0])
        s2.append(cols[1])
        scores.append(_float(g.strip(), f"{pg}:{i}"))
    name = pi.name.removeprefix("STS.input.").removesuffix(".txt")
    return StsSet(name, s1, s2, scores)


def _sniff(path: Path) -> str:
    """``"sick"``, ``"stsb"``, ``"senteval"`` or ``""`` (not an STS file) from a file's content."""
    if path.name.startswith("STS.input.") and path.suffix == ".txt":
        return "senteval"
    if path.suffix not in (".csv", ".txt", ".tsv"):
        return ""
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline()
    cols = first.rstrip("\n").split("\t")
    if "sentence_A" in cols and "relatedness_score" in cols:
        return "sick"
    if len(cols) >= 7:
        try:
            float(cols[4])
            return "stsb"
        except ValueError:
            return ""
    return ""


def load_sts(path: str | Path) -> list[StsSet]:
    """All STS sets in a file or folder (folder: every recognised file, sorted by name).

    Raises:
        FileNotFoundError: missing path.
        ValueError: a folder without STS files, or a malformed file (names file and line).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"STS data not found: {p}")
    files = sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p]
    sets = []
    for f in files:
        kind = _sniff(f)
        if kind == "sick":
            sets.append(read_sick(f))
        elif kind == "stsb":
            sets.append(read_stsb(f))
        elif kind == "senteval":
            gs = f.with_name(f.name.replace("STS.input.", "STS.gs.", 1))
            if not gs.is_file():
                raise ValueError(f"{f}: gold file {gs.name} not found beside it")
            sets.append(read_senteval(f, gs))
    if not sets:
        raise ValueError(
            f"{p}: no STS files (STS-B sts-*.csv, SICK *.txt with header, or STS.input.*.txt)"
        )
    return sets


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (``scipy.stats.rankdata`` 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    bounds = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1], True])  # starts of tie runs + n
    avg = (bounds[:-1] + bounds[1:] - 1) / 2.0 + 1.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, np.diff(bounds))
    return ranks


def spearman(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks), as ``scipy.stats.spearmanr``.

    Raises:
        ValueError: on fewer than 2 values or different lengths.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(
            f"spearman needs two 1-D arrays of equal length >= 2, got {x.shape}, {y.shape}"
        )
    rx, ry = _ranks(x) - (len(x) + 1) / 2.0, _ranks(y) - (len(y) + 1) / 2.0
    den = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def cosine_scores(encode: Callable[[list[str]], torch.Tensor], sts: StsSet) -> np.ndarray:
    """Cosine similarity of each pair ``(N,)`` with ``encode: list[str] -> (n, D)``.

    Each distinct sentence is encoded once.
    """
    uniq = list(dict.fromkeys(sts.sentences1 + sts.sentences2))
    index = {s: i for i, s in enumerate(uniq)}
    emb = torch.nn.functional.normalize(encode(uniq).float(), dim=-1)  # (U, D)
    a = emb[[index[s] for s in sts.sentences1]]  # (N, D)
    b = emb[[index[s] for s in sts.sentences2]]  # (N, D)
    return (a * b).sum(-1).numpy()


def sts_scores(
    encode: Callable[[list[str]], torch.Tensor], sets: list[StsSet]
) -> dict[str, object]:
    """Spearman x 100 per set and SentEval's ``all``/``mean``/``wmean`` aggregates.

    Args:
        encode: sentences -> ``(n, D)`` embeddings (normalised or not).
        sets: the sets to score (names must be distinct).

    Returns:
        ``{"spearman": {set: float}, "n_pairs": {set: int}, "all": float, "mean": float,
        "wmean": float}``; all Spearman values are x 100.

    Raises:
        ValueError: duplicate set names or an empty set.
    """
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate STS set names: {names}")
    per: dict[str, float] = {}
    sizes: dict[str, int] = {}
    pooled_sys, pooled_gold = [], []
    for s in sets:
        if len(s) < 2:
            raise ValueError(f"STS set '{s.name}' has {len(s)} scored pairs (need >= 2)")
        sys = cosine_scores(encode, s)
        per[s.name] = 100.0 * spearman(sys, s.scores)
        sizes[s.name] = len(s)
        pooled_sys.append(sys)
        pooled_gold.append(np.asarray(s.scores))
    values = np.array([per[n] for n in names])
    weights = np.array([sizes[n] for n in names], dtype=np.float64)
    return {
        "spearman": per,
        "n_pairs": sizes,
        "all": 100.0 * spearman(np.concatenate(pooled_sys), np.concatenate(pooled_gold)),
        "mean": float(values.mean()),
        "wmean": float((values * weights).sum() / weights.sum()),
    }


__all__ = [
    "StsSet",
    "cosine_scores",
    "load_sts",
    "read_senteval",
    "read_sick",
    "read_stsb",
    "spearman",
    "sts_scores",
]
