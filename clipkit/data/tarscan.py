"""Random access into plain tars: a header scan that finds members, and pread by offset.

Reading an ImageFolder tar (CIFAR-10's ``test.tar``: 10k members) through ``tarfile`` costs
~60 us per member building TarInfo objects (0.6 s on the shared machine); the 512-byte headers
hold all a reader needs, so :func:`scan_tar` walks them and records ``(offset, size)`` per
member, and :func:`read_member` reads one member with ``os.pread`` (no shared file position, so
DataLoader workers can share the scan).

Damage follows :mod:`clipkit.data.tar_samples`: the members before the damage are kept, the
problem is counted in a :class:`~clipkit.data.tar_samples.TarStats` and logged once naming the
file. ``tarfile`` itself stops silently at an invalid header after the first one (and at a file
cut between two members), which would read a prefix of the set without a word; the scan tells:

* ``truncated``: the file ends inside a header, inside a member's data, or without the
  end-of-archive marker (:func:`~clipkit.data.shards.tar_end_ok`); a member cut short is left out
  and counted as a partial sample (its key named);
* ``unreadable``: a header's checksum does not match (garbage in the middle of the file). Unlike a
  stream, a file can be searched: the scan skips 512-byte blocks to the next valid header (as GNU
  tar's "skipping to next header" does) and keeps the members after the damage, so bytes written
  over one spot cost the members they hit, not the rest of the tar.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from clipkit.data.shards import COMPRESSED_MAGIC, tar_end_ok
from clipkit.data.tar_samples import TRUNCATED, UNREADABLE, TarStats, record_problem

# Member types whose data is skipped: directories, links, devices, fifos, sparse...
_FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files
_GNU_LONGNAME, _PAX, _PAX_GLOBAL = b"L", b"x", b"g"


class TarMember(NamedTuple):
    """Where one member's data lies in a plain tar (picklable, so workers can read it).

    A NamedTuple: building 10k of them costs a third of what frozen dataclasses do.
    """

    tar: str
    offset: int  # byte offset of the data (after the header)
    size: int
    name: str  # member path, a leading ``./`` dropped


def is_compressed(path: str | Path) -> bool:
    """True for gzip/bzip2/xz files (which cannot be read by offset)."""
    with open(path, "rb") as f:
        return f.read(6).startswith(COMPRESSED_MAGIC)


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``"<len> path=<value>\\n"`` records)."""
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            return None
        length = int(data[pos:sp])
        rec = data[sp + 1 : pos + length - 1]
        if rec.startswith(b"path="):
            return rec[5:].decode("utf-8", "surrogateescape")
        pos += length
    return None


def scan_tar(
    path: str | Path, stats: TarStats | None = None, limit: int | None = None
) -> list[TarMember]:
    """Every regular file member of a plain tar, in tar order, with its data offset and size.

    Handles ustar prefixes, GNU long names and pax ``path`` records. Damage after the first
    header is counted in ``stats`` (one warning naming the file); the members before it are
    returned and a member cut short by the end of the file is left out.

    Args:
        path: an uncompressed tar (see :func:`is_compressed`).
        stats: counts the scan as one shard, its members as samples and any damage.
        limit: stop after this many members; for sniffing, so damage is then not reported.

    Returns:
        ``TarMember`` s, names without a leading ``./``.

    Raises:
        ValueError: the file is missing, compressed, or not a tar at all (bad first header).

    Example:
        >>> [m.name for m in scan_tar("cifar10/test.tar")][:1]  # doctest: +SKIP
        ['airplane/0001.png']
    """
    path = str(path)
    stats = stats if stats is not None else TarStats()
    try:
        file_size = os.path.getsize(path)
        f = open(path, "rb")  # noqa: SIM115 (closed in finally; buffered reads beat pread here)
    except OSError as err:
        raise ValueError(f"cannot read tar {path}: {err.strerror or err}") from None
    out: list[TarMember] = []
    problem: tuple[str, str] | None = None
    damaged: list[tuple[int, int]] = []  # (start, end) of garbage the scan skipped
    dropped: str | None = None  # key of a member cut short by the end of the file
    long_name: str | None = None
    magic = b""
    try:
        if f.read(6).startswith(COMPRESSED_MAGIC):
            raise ValueError(f"cannot read tar {path} by offset: it is compressed")
        off = 0
        while limit is None or len(out) < limit:
            f.seek(off)
            hdr = f.read(512)
            if not hdr:
                problem = (TRUNCATED, f"no end-of-archive marker: the file ends after {off} bytes")
                break
            if len(hdr) < 512:
                problem = (TRUNCATED, f"the file ends inside the tar header at byte {off}")
                break
            if hdr == bytes(512):
                # The end-of-archive marker, unless valid headers follow (a zeroed region).
                nxt = _next_header(f, off + 512, magic) if off else None
                if nxt is not None:
                    damaged.append((off, nxt))
                    off, long_name = nxt, None
                    continue
                if not tar_end_ok(path):
                    problem = (TRUNCATED, "the end-of-archive marker is cut short")
                break
            size = _header_size(hdr)
            if size is None:
                if off == 0:
                    raise ValueError(f"cannot read tar {path}: not a tar file")
                nxt = _next_header(f, off + 512, magic)
                damaged.append((off, nxt if nxt is not None else file_size))
                long_name = None  # a long name before the damage belongs to a lost member
                if nxt is None:
                    break
                off = nxt
                continue
            if off == 0:
                magic = hdr[257:263]
            data_off = off + 512
            if data_off + size > file_size:
                cut = _name(hdr)
                problem = (TRUNCATED, f"the file ends inside member {cut}")
                if hdr[156:157] in _FILE_TYPES:
                    dropped = (long_name or cut).removeprefix("./").rsplit(".", 1)[0]
                break
            kind = hdr[156:157]
            if kind == _GNU_LONGNAME:
                long_name = f.read(size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == _PAX:
                long_name = _pax_path(f.read(size)) or long_name
            elif kind != _PAX_GLOBAL:
                if kind in _FILE_TYPES:
                    name = (long_name or _name(hdr)).removeprefix("./")
                    out.append(TarMember(path, data_off, size, name))
                long_name = None
            off = data_off + (size + 511) // 512 * 512
    finally:
        f.close()
    stats.shards += 1
    stats.samples += len(out)
    if damaged:
        problem = _garbage_problem(damaged, problem)
    if problem is not None and limit is None:
        skipped = sum(end - start for start, end in damaged)
        record_problem(stats, path, problem, len(out), dropped, skipped_bytes=skipped)
    return out


def _header_size(hdr: bytes) -> int | None:
    """The member size a 512-byte header gives, or None when its checksum does not match."""
    try:
        chksum = int(hdr[148:156].strip(b"\0 ") or b"-1", 8)
        size = _number(hdr[124:136])
    except ValueError:
        return None
    return size if chksum == sum(hdr[:148]) + 256 + sum(hdr[156:]) else None


def _next_header(f: Any, pos: int, magic: bytes) -> int | None:
    """Offset of the next block from ``pos`` that is a valid header with the tar's ``magic``.

    Blocks of member data are skipped; a header must checksum and carry the same format magic
    as the tar's first header, so image bytes are not taken for one (a random block passes the
    checksum about once in 10^5 and the magic once in 2^48 more). A member that is itself a
    tar could still match; ImageFolder tars hold images.
    """
    f.seek(pos)
    while True:
        block = f.read(512)
        if len(block) < 512:
            return None
        if block[257:263] == magic and block != bytes(512) and _header_size(block) is not None:
            return pos
        pos += 512


def _garbage_problem(
    damaged: list[tuple[int, int]], problem: tuple[str, str] | None
) -> tuple[str, str]:
    start, end = damaged[0]
    more = f" and {len(damaged) - 1} more damaged region(s)" if len(damaged) > 1 else ""
    reason = f"invalid tar header at byte {start}, skipped to byte {end}{more}"
    return UNREADABLE, reason + (f"; then {problem[1]}" if problem else "")


def _name(hdr: bytes) -> str:
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:262] == b"ustar":
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


_FDS: dict[tuple[int, str], int] = {}


def read_member(member: TarMember) -> bytes:
    """The data of one member, by ``pread`` at its offset (b"" when the tar is gone)."""
    # One descriptor per process and tar (DataLoader workers fork, so key by pid).
    key = (os.getpid(), member.tar)
    fd = _FDS.get(key)
    try:
        if fd is None:
            fd = _FDS[key] = os.open(member.tar, os.O_RDONLY)
        return os.pread(fd, member.size, member.offset)
    except OSError:
        return b""


@lru_cache(maxsize=64)
def _index(path: str, size: int, mtime_ns: int) -> dict[str, TarMember]:
    # size and mtime are part of the cache key, so a rewritten tar is scanned again.
    return {m.name: m for m in scan_tar(path)}


def member_index(path: str | Path) -> dict[str, TarMember]:
    """``{member name: TarMember}`` of a plain tar, cached while the file is unchanged.

    Raises:
        ValueError: as :func:`scan_tar`.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        raise ValueError(f"cannot read tar {path}: {err.strerror or err}") from None
    return _index(str(path), st.st_size, st.st_mtime_ns)
