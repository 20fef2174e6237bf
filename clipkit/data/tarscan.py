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
  end-of-archive marker (:func:`~clipkit.data.shards.tar_end_ok`);
* ``unreadable``: a header's checksum does not match (garbage in the middle of the file).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

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
    long_name: str | None = None
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
                if not tar_end_ok(path):
                    problem = (TRUNCATED, "the end-of-archive marker is cut short")
                break
            try:
                chksum = int(hdr[148:156].strip(b"\0 ") or b"-1", 8)
                size = _number(hdr[124:136])
            except ValueError:
                chksum, size = -1, 0
            if chksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):
                if off == 0:
                    raise ValueError(f"cannot read tar {path}: not a tar file")
                problem = (UNREADABLE, f"invalid tar header at byte {off}")
                break
            data_off = off + 512
            if data_off + size > file_size:
                problem = (TRUNCATED, f"the file ends inside member {_name(hdr)}")
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
    if problem is not None and limit is None:
        record_problem(stats, path, problem, len(out))
    return out


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
