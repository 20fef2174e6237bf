"""One robust reader of WebDataset tar shards: grouped samples, fixed order, damage counted.

:func:`tar_samples` reads local tars in the given order and groups consecutive members with the
same key into one sample, as webdataset does (``dir/0001.jpg`` + ``dir/0001.cls`` ->
``{"__key__": "dir/0001", "__url__": tar, "jpg": ..., "cls": ...}``). A damaged shard never
raises: the reader keeps the samples before the damage, stops that shard, counts the problem in a
:class:`TarStats`, logs one warning line naming the file and goes on with the next shard.

Damage it tells apart:

* ``truncated``: the file ends before its end-of-archive marker, either inside a member, inside
  a header, or exactly between two members. Python's streaming tar reader takes the last two
  for a clean end, so the reader checks the end itself (:func:`~clipkit.data.shards.tar_end_ok`).
* ``unreadable``: the file cannot be opened, is not a tar, or has an invalid header after its
  first members (the rest of the file cannot be located).

The sample in progress when a shard breaks is kept only when it is known to be whole: the end-
of-archive marker was reached, or it has the same fields as the sample before it in that shard
(shards hold uniform samples, so a cut between two samples loses nothing). Otherwise (a shard's
first sample has nothing to compare with) it is dropped and counted as a partial sample, because
a half sample (an image without its label) would break its consumer.

Why not webdataset's own tar iteration (``webdataset.tarfile_samples``): it groups the same way
(tested equal in tests/data/test_tar_samples.py), but a shard cut between two samples reads as a
clean, shorter shard (checked on webdataset 1.x: 2 of 3 samples, no error, no count), which is the
silent data loss this reader exists to report.

The training stream (:mod:`clipkit.data.stream`) keeps its own webdataset reader: its resume
positions count the samples that reader yields.
"""

from __future__ import annotations

import logging
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.data.shards import COMPRESSED_MAGIC, tar_end_ok

log = logging.getLogger(__name__)

TRUNCATED = "truncated"
UNREADABLE = "unreadable"

# webdataset's rules, so keys and fields match what its readers produce:
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # key = path up to the first dot of the name
_META = re.compile(r"__[^/]*__($|/)")  # metadata members (__index__ ...) carry no sample
# What a damaged tar (or its decompressor) raises; anything else is a bug and propagates.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)

Sample = dict[str, Any]


@dataclass(frozen=True)
class TarProblem:
    """Why one shard was cut short (picklable, so DataLoader workers can pass it on)."""

    url: str
    kind: str  # TRUNCATED or UNREADABLE
    reason: str
    samples: int  # samples yielded from this shard before the problem
    dropped_key: str | None = None  # key of the incomplete last sample left out, if any
    skipped_bytes: int = 0  # garbage a header scan skipped over to read on (0: read stopped)

    def __str__(self) -> str:
        dropped = (
            f", dropped its possibly incomplete sample {self.dropped_key}"
            if self.dropped_key
            else ""
        )
        if self.skipped_bytes:
            return (
                f"{self.url}: {self.kind} shard ({self.reason}); kept {self.samples} sample(s) "
                f"before and after it{dropped}, skipped {self.skipped_bytes} damaged bytes "
                "(the members whose headers lay there are lost)"
            )
        return (
            f"{self.url}: {self.kind} shard ({self.reason}); "
            f"kept {self.samples} sample(s) before it{dropped}, skipped the rest of the shard"
        )


@dataclass
class TarStats:
    """Counts of one :func:`tar_samples` run (pass one in to read them afterwards)."""

    shards: int = 0  # shards opened (or tried)
    samples: int = 0  # samples yielded
    truncated_shards: int = 0
    unreadable_shards: int = 0
    partial_samples: int = 0  # incomplete samples dropped where a shard broke
    problems: list[TarProblem] = field(default_factory=list)
    # ``url:member`` of members whose field the same sample already had (the last one is kept)
    duplicate_members: list[str] = field(default_factory=list)

    @property
    def skipped_shards(self) -> int:
        """Shards cut short, for any reason."""
        return self.truncated_shards + self.unreadable_shards

    def as_dict(self) -> dict[str, int]:
        """The counters (no problem details), e.g. for a JSON summary."""
        return {
            "shards": self.shards,
            "samples": self.samples,
            "truncated_shards": self.truncated_shards,
            "unreadable_shards": self.unreadable_shards,
            "partial_samples": self.partial_samples,
        }


def tar_samples(
    urls: Iterable[str | Path],
    stats: TarStats | None = None,
    on_problem: Callable[[TarProblem], None] | None = None,
) -> Iterator[Sample]:
    """Yield the samples of local tar shards, shard by shard in the given order.

    Args:
        urls: tar paths (plain, or gzip/bzip2/xz-compressed).
        stats: updated as samples are read; pass one to learn what was skipped.
        on_problem: called once per damaged shard, after its last kept sample was yielded and
            before any sample of the next shard (a DataLoader worker forwards these).

    Yields:
        ``{"__key__": str, "__url__": str, ext: bytes, ...}`` per sample, in tar order. Keys
        follow webdataset (member path up to the first dot of its name, a leading ``./``
        dropped); extensions are lower-cased.
    """
    stats = stats if stats is not None else TarStats()
    for url in urls:
        yield from _shard(str(url), stats, on_problem)


def _shard(
    url: str, stats: TarStats, on_problem: Callable[[TarProblem], None] | None
) -> Iterator[Sample]:
    stats.shards += 1
    kept = 0
    current: Sample | None = None  # sample being assembled
    prev_fields: frozenset[str] | None = None  # fields of the last sample yielded
    problem: tuple[str, str] | None = None
    whole = False  # the end-of-archive marker was reached: every member was read
    reading = ""  # member whose data is being read, to name it when the file ends inside it
    try:
        with open(url, "rb") as f:
            plain = not f.read(6).startswith(COMPRESSED_MAGIC)
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r|*") as tf:
                for member in tf:
                    tf.members = []  # stream mode would keep every TarInfo of a large shard
                    if not member.isreg():
                        continue
                    name = member.name.removeprefix("./")
                    m = _KEY.match(name)
                    if m is None or _META.match(name):
                        continue
                    key, ext = m.group(1), m.group(2).lower()
                    if current is None or key != current["__key__"]:
                        if current is not None:
                            prev_fields = _fields(current)
                            kept += 1
                            stats.samples += 1
                            yield current
                        current = {"__key__": key, "__url__": url}
                    # A repeated field keeps its last value (no sample is lost over it);
                    # it is counted, so verify can report it.
                    if ext in current:
                        stats.duplicate_members.append(f"{url}:{member.name}")
                    reading = member.name
                    current[ext] = tf.extractfile(member).read()
                    reading = ""
                end = tf.offset  # the header where reading stopped
            if plain:
                problem, whole = _check_end(f, url, end)
    except _TAR_ERRORS as err:
        problem = _classify(err, reading)
    if current is not None and (problem is None or whole or _fields(current) == prev_fields):
        kept += 1
        stats.samples += 1
        yield current
        current = None
    if problem is None:
        return
    dropped = current["__key__"] if current is not None and _fields(current) else None
    record_problem(stats, url, problem, kept, dropped, on_problem)


def record_problem(
    stats: TarStats,
    url: str,
    problem: tuple[str, str],
    kept: int,
    dropped: str | None = None,
    on_problem: Callable[[TarProblem], None] | None = None,
    skipped_bytes: int = 0,
) -> TarProblem:
    """Count one damaged tar in ``stats`` and log the one warning line that names it.

    Shared by this reader and the header scan (:mod:`clipkit.data.tarscan`), so every damaged
    tar is reported the same way.

    Args:
        stats: updated in place.
        url: the tar.
        problem: ``(TRUNCATED or UNREADABLE, reason)``.
        kept: samples (or members) read before the damage.
        dropped: key of an incomplete sample left out, if any.
        on_problem: called with the :class:`TarProblem`.
        skipped_bytes: damaged bytes a header scan skipped to read on after them.
    """
    found = TarProblem(url, problem[0], problem[1], kept, dropped, skipped_bytes)
    if found.kind == TRUNCATED:
        stats.truncated_shards += 1
    else:
        stats.unreadable_shards += 1
    stats.partial_samples += dropped is not None
    stats.problems.append(found)
    log.warning("data: %s", found)
    if on_problem is not None:
        on_problem(found)
    return found


def _fields(sample: Sample) -> frozenset[str]:
    return frozenset(k for k in sample if not k.startswith("__"))


def _check_end(f: Any, url: str, offset: int) -> tuple[tuple[str, str] | None, bool]:
    """Why a plain tar that read without error is still damaged: ``(problem, whole)``.

    ``offset`` is the header where the streaming reader stopped. It stops silently at the end of
    the file, at a cut header and at an invalid header, not only at the end-of-archive marker.
    """
    f.seek(offset)
    block = f.read(512)
    if not block:
        return (TRUNCATED, f"no end-of-archive marker: the file ends after {offset} bytes"), False
    if block != bytes(len(block)):
        if len(block) < 512:
            return (TRUNCATED, f"the file ends inside the tar header at byte {offset}"), False
        return (UNREADABLE, f"invalid tar header at byte {offset}"), False
    whole = len(block) == 512  # a zero block starts the end-of-archive marker
    if not tar_end_ok(url):
        return (TRUNCATED, "the end-of-archive marker is cut short"), whole
    return None, whole


def _classify(err: BaseException, member: str) -> tuple[str, str]:
    msg = str(err) or type(err).__name__
    where = f" in {member}" if member else ""
    if isinstance(err, EOFError) or "unexpected end" in msg or msg == "empty file":
        return TRUNCATED, f"{msg}{where}"
    return UNREADABLE, f"{type(err).__name__}: {msg}{where}"
