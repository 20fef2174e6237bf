"""Elastic resume: continue an epoch's sample order on another number of processes or workers.

The epoch's order is defined by its *streams*: the logical readers of the layout the epoch
started on (``W`` ranks x ``K`` workers, stream ``g = rank * K + worker``). Each stream is a pure
function of ``(seed, epoch, g)`` (its shards, shuffle buffer and per-sample crops), so raw
position ``i`` of stream ``g`` names one sample, and one crop, whatever process reads it.

A checkpoint holds every rank's position in its streams. Resuming on ``W' x K'`` turns those
positions into the epoch's *remaining pieces*: raw ranges ``[begin, end)`` of streams, in
stream order. Their concatenation (``N`` samples) is cut into ``W' x K'`` contiguous chunks of
``N // R'`` or ``N // R' + 1`` samples; new reader ``j = rank' * K' + worker'`` replays the
streams of its chunk undecoded up to each piece and decodes the piece. Every sample left in the
epoch is read once, by one reader, with the crop the uninterrupted run would have drawn; the
readers drop only a partial last batch (``n_j mod B'`` samples each), and ranks step equally
(the largest quotas are trimmed, as in :func:`clipkit.data.shards.plan_epoch`). The next epoch
is planned on the new layout. A stream whose reader had already filled its quota contributes
nothing: the original plan dropped its tail.

Exact for shards with ``sizes.json`` (ImageFolder inputs always know their sizes); with sizes
estimated from ``data.num_samples`` a piece's end is an estimate too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipkit.data.shards import Source, plan_epoch

# One piece: raw positions [begin, end) of stream ``stream`` (positions count every raw
# sample, decodable or not, in the stream's shuffled order).
Piece = tuple[int, int, int]


@dataclass
class Stream:
    """Logical reader ``worker`` of ``rank`` in the epoch's first layout."""

    rank: int
    worker: int
    urls: list[str]
    count: int  # raw samples in one pass over ``urls``


def epoch_streams(
    sources: list[Source], epoch: int, seed: int, layout: tuple[int, int], num_samples: int
) -> dict[int, Stream]:
    """The streams of ``epoch`` begun on ``layout = (ranks, readers per rank)``, by id."""
    ranks, readers = layout
    out: dict[int, Stream] = {}
    for r in range(ranks):
        plan = plan_epoch(
            sources,
            epoch=epoch,
            seed=seed,
            rank=r,
            world_size=ranks,
            workers=readers,
            batch_size=1,  # the streams do not depend on the batch size
            train=True,
            num_samples=num_samples,
        )
        for w in range(readers):
            out[r * readers + w] = Stream(r, w, plan.urls[w], plan.counts[w])
    return out


def continue_epoch(
    states: list[dict[str, Any]],
    streams: dict[int, Stream],
    world_size: int,
    workers: int,
    rank: int,
    batch_size: int,
) -> tuple[list[list[Piece]], list[int], int]:
    """What ``rank`` of a ``world_size x workers`` layout reads of the rest of the saved epoch.

    Returns:
        Per reader of ``rank`` its pieces; per reader its batch quota; batches per rank.
    """
    chunks = split_pieces(remaining_pieces(states, streams), world_size * workers)
    quotas, num_batches = plan_quotas(chunks, world_size, workers, rank, batch_size)
    return chunks[rank * workers : (rank + 1) * workers], quotas, num_batches


def remaining_pieces(states: list[dict[str, Any]], streams: dict[int, Stream]) -> list[Piece]:
    """The epoch's samples not yet yielded, as pieces in stream order.

    Args:
        states: every rank's :meth:`ShardLoader.state_dict`, rank order.
        streams: the epoch's streams by id (from the layout in ``states``).

    Returns:
        Non-empty pieces sorted by ``(stream, begin)``.
    """
    out: list[Piece] = []
    for state in states:
        quotas = state["quotas"]
        pieces = state.get("pieces")
        for j, (pos, produced) in enumerate(zip(state["positions"], state["produced"])):
            if quotas[j] is not None and produced >= quotas[j]:
                continue  # its quota is filled: the plan drops the rest of its samples
            if pieces is None:  # an epoch on its first layout: reader j is one stream
                g = state["rank"] * len(state["positions"]) + j
                out.append((g, pos, streams[g].count))
                continue
            mine, k = pieces[j], state["piece_idx"][j]
            if k < len(mine):
                g, begin, end = mine[k]
                out.append((g, max(pos, begin), end))
                out += [tuple(p) for p in mine[k + 1 :]]
    return sorted((p for p in out if p[2] > p[1]), key=lambda p: (p[0], p[1]))


def split_pieces(pieces: list[Piece], readers: int) -> list[list[Piece]]:
    """Cut the concatenation of ``pieces`` into ``readers`` contiguous chunks (sizes differ by at
    most one sample); chunk ``j`` is new reader ``j``'s pieces, in order."""
    total = sum(e - b for _, b, e in pieces)
    bounds = [j * total // readers for j in range(readers + 1)]
    chunks: list[list[Piece]] = [[] for _ in range(readers)]
    at = 0  # virtual position of the current piece's begin
    for g, b, e in pieces:
        for j in range(readers):
            lo, hi = max(bounds[j], at), min(bounds[j + 1], at + e - b)
            if hi > lo:
                chunks[j].append((g, b + lo - at, b + hi - at))
        at += e - b
    return chunks


def plan_quotas(
    chunks: list[list[Piece]], world_size: int, workers: int, rank: int, batch_size: int
) -> tuple[list[int], int]:
    """Batches per reader of ``rank`` and per rank, equal on every rank (drop_last).

    0 when fewer samples are left than one batch per rank (a checkpoint at the epoch's end):
    the resumed epoch yields nothing and the next one starts.
    """
    sizes = [sum(e - b for _, b, e in c) for c in chunks]
    quotas = [
        [sizes[r * workers + w] // batch_size for w in range(workers)] for r in range(world_size)
    ]
    num_batches = min(sum(q) for q in quotas)
    mine = quotas[rank]
    # As plan_epoch: trim the largest quotas first so every rank steps num_batches times.
    while sum(mine) > num_batches:
        mine[max(range(workers), key=lambda w: (mine[w], -w))] -= 1
    return mine, num_batches


def merged_stats(states: list[dict[str, Any]]) -> dict[str, int]:
    """Skip counters summed over the saved ranks (the new rank 0 carries them on)."""
    out: dict[str, int] = {}
    for state in states:
        for k, v in state["stats"].items():
            out[k] = out.get(k, 0) + int(v)
    return out
