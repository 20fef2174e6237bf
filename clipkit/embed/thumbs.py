"""The images behind indexed ids (``GET /image/{id}``), and how server paths appear in answers.

An index's ``metadata.parquet`` stores each id's image as a file path or ``<tar>#<key>`` (a shard
sample or an ImageFolder-tar member, key without extension: ``bird/0014`` for member
``./bird/0014.jpg``). :func:`open_image` finds it through the input layer's tar reader
(:func:`clipkit.data.tarscan.member_index`, which stops at damage and leaves cut members out),
checks that it is an image, and returns a stream of it; anything missing or damaged is an
:class:`ImageUnavailable` carrying 404 or 410, never an exception of the reader.

:class:`PathView` keeps the server's folders out of answers: paths are shown relative to a data
root (by default the common folder of the index's images), others by file name only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from clipkit.data.records import IMAGE_EXTS
from clipkit.data.sources import read_tar_image
from clipkit.data.tarscan import is_compressed, member_index

PATH_COLUMNS = ("path", "source_dir")  # metadata columns that hold server paths
_HEAD = 1 << 20  # bytes read to identify an image (headers, EXIF, ICC profiles)
_CHUNK = 1 << 16


class ImageUnavailable(Exception):
    """No image to answer with: ``status`` 404 (none stored / unknown) or 410 (gone, damaged)."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status, self.msg = status, msg


class PathView:
    """Server paths as answers show them.

    Args:
        root: folder that paths are shown relative to; None shows file names only.
        absolute: show paths as stored (``--absolute-paths``).
    """

    def __init__(self, root: str | None, absolute: bool = False) -> None:
        self.root = os.path.abspath(root) if root else None
        self.absolute = absolute

    @classmethod
    def of_catalog(cls, metadata: Any, root: str | None, absolute: bool) -> PathView:
        """The view for a catalog: ``root``, or the common folder of its stored image paths."""
        if root is None and metadata is not None and "path" in metadata:
            files = metadata["path"].dropna().astype(str).str.split("#", n=1).str[0]
            dirs = {os.path.dirname(f) for f in files.unique() if os.path.isabs(f)}
            root = os.path.commonpath(sorted(dirs)) if dirs else None
        return cls(root, absolute)

    def show(self, value: str) -> str:
        """``value`` (a path, ``<tar>#<key>``, or anything else) as an answer shows it."""
        file, sep, key = value.rpartition("#") if "#" in value else (value, "", "")
        if self.absolute or not os.path.isabs(file):
            return value
        if self.root is not None:
            rel = os.path.relpath(file, self.root)
            if rel != ".." and not rel.startswith(".." + os.sep):
                return rel + sep + key
        return os.path.basename(file) + sep + key

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A metadata row with its path columns shown."""
        return {
            k: self.show(v) if k in PATH_COLUMNS and isinstance(v, str) else v
            for k, v in row.items()
        }


def open_image(ref: str, max_bytes: int, shown: str) -> tuple[Iterator[bytes], str]:
    """The stored image ``ref`` (a file path or ``<tar>#<key>``) as chunks and a media type.

    Args:
        ref: as stored in the metadata (relative paths resolve against the working folder).
        max_bytes: larger images are refused (413).
        shown: ``ref`` as answers may show it (for messages).

    Raises:
        ImageUnavailable: 410 when the file is gone or the tar no longer holds the member
            (truncated, overwritten), 410 when the bytes are not an image, 413 when too large.
    """
    file, _, key = ref.rpartition("#") if "#" in ref and not Path(ref).is_file() else (ref, "", "")
    if not Path(file).is_file():
        raise ImageUnavailable(410, f"{shown}: the file is no longer there")
    if not key:
        return _stream(file, 0, os.path.getsize(file), max_bytes, shown)
    try:
        if not is_compressed(file):
            members = member_index(file)
            m = next((members[key + e] for e in IMAGE_EXTS if key + e in members), None)
            if m is None:
                raise ImageUnavailable(
                    410, f"{shown}: the tar no longer holds this image (damaged or rewritten)"
                )
            return _stream(m.tar, m.offset, m.size, max_bytes, shown)
        data = read_tar_image(file, key)  # compressed: no offsets, one pass over the file
    except (OSError, ValueError) as err:
        raise ImageUnavailable(410, f"{shown}: the tar cannot be read ({err})") from None
    if data is None:
        raise ImageUnavailable(410, f"{shown}: the tar no longer holds this image")
    if len(data) > max_bytes:
        raise ImageUnavailable(413, f"{shown}: {len(data)} bytes exceed {max_bytes}")
    return iter([data]), _media_type(data[:_HEAD], shown)


def _stream(
    path: str, offset: int, size: int, max_bytes: int, shown: str
) -> tuple[Iterator[bytes], str]:
    if size > max_bytes:
        raise ImageUnavailable(413, f"{shown}: {size} bytes exceed the limit of {max_bytes}")
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the generator; it outlives this call)
    except OSError as err:
        raise ImageUnavailable(410, f"{shown}: cannot be read ({err.strerror})") from None
    try:
        f.seek(offset)
        head = f.read(min(size, _HEAD))
        if len(head) < min(size, _HEAD):
            raise ImageUnavailable(410, f"{shown}: the file is shorter than its index says")
        media = _media_type(head, shown)
    except BaseException:
        f.close()
        raise

    def chunks() -> Iterator[bytes]:
        # The open file is read even if it is replaced meanwhile: no half-sent answer.
        with f:
            yield head
            left = size - len(head)
            while left > 0:
                block = f.read(min(_CHUNK, left))
                if not block:
                    return
                left -= len(block)
                yield block

    return chunks(), media


def _media_type(head: bytes, shown: str) -> str:
    try:
        fmt = Image.open(io.BytesIO(head)).format  # header only
    except Exception:  # PIL raises many types for bytes that are no image
        raise ImageUnavailable(410, f"{shown}: the stored bytes are not a readable image") from None
    return Image.MIME.get(fmt or "", "application/octet-stream")
