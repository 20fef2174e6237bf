"""Shared by the damaged-shard tests in tests/data, tests/eval and tests/embed."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_plain_tar(path: Path, members: list[tuple[str, bytes]]) -> list[int]:
    """Write a plain ustar tar; returns the byte offset where each member (header + data) ends,
    so a test can cut the file exactly between members or inside one."""
    ends = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            ends.append(tf.offset)
    return ends
