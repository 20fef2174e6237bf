"""JSON bodies parsed with limits: depth and value count checked before parsing, numbers while.

``json.loads`` recurses once per nesting level (1,100 levels: RecursionError), turns ``1e400``
into ``inf`` (then ``int(inf)``: OverflowError), accepts ``NaN``/``Infinity`` and parses a
401-digit integer that no float holds. :func:`loads_bounded` refuses each with a ValueError of
one line, and bounds the memory of the parsed value by the number of JSON values.

Example:
    >>> loads_bounded(b'{"k": 5}', max_depth=8, max_items=100, max_number_chars=20)
    {'k': 5}
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

# A JSON string, unrolled so the regex stays linear on long base64 strings.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# Brackets -> 2 (open) / 0 (close), everything else deleted: a step of +1 / -1 after "- 1".
_TABLE = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[{]}")
_CHUNK = 1 << 20  # numpy works on 1 MiB of brackets at a time: a few MiB of scratch at most


def structure(raw: bytes) -> tuple[int, int]:
    """``(nesting depth, commas)`` of a JSON text, outside its strings (no parsing).

    Example:
        >>> structure(b'[[1, 2], {"a": "[,"}]')
        (2, 2)
    """
    bare = _STRING.sub(b'""', raw)
    brackets = bare.translate(_TABLE, _NOT_BRACKET)
    depth = peak = 0
    for s in range(0, len(brackets), _CHUNK):
        steps = np.frombuffer(brackets[s : s + _CHUNK], np.uint8).astype(np.int32) - 1
        level = np.cumsum(steps) + depth  # nesting level after each bracket
        peak, depth = max(peak, int(level.max())), int(level[-1])
    return peak, bare.count(b",")


def loads_bounded(raw: bytes, max_depth: int, max_items: int, max_number_chars: int) -> Any:
    """Parse a JSON body within limits.

    Args:
        raw: the body (UTF-8).
        max_depth: deepest nesting of arrays/objects.
        max_items: JSON values in all (bounded by commas + 1 before parsing).
        max_number_chars: characters of one number literal.

    Returns:
        The parsed value; every float finite.

    Raises:
        ValueError: one line naming the limit or the JSON error.
    """
    depth, commas = structure(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nesting depth {depth} exceeds the limit of {max_depth}")
    if commas + 1 > max_items:
        raise ValueError(f"JSON body holds over {max_items} values (the limit)")

    def number(s: str) -> str:
        if len(s) > max_number_chars:
            raise ValueError(
                f"JSON number of {len(s)} characters ({s[:12]}...) exceeds the limit of "
                f"{max_number_chars}"
            )
        return s

    def parse_float(s: str) -> float:
        v = float(number(s))
        if not math.isfinite(v):
            raise ValueError(f"JSON number {s} is out of the float64 range")
        return v

    def parse_constant(s: str) -> float:
        raise ValueError(f"JSON does not allow {s}")

    try:
        return json.loads(
            raw,  # bytes: the decoded text lives only while parsing
            parse_int=lambda s: int(number(s)),
            parse_float=parse_float,
            parse_constant=parse_constant,
        )
    except json.JSONDecodeError as err:
        raise ValueError(
            f"body is not valid JSON ({err.msg} at line {err.lineno} col {err.colno})"
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"body is not UTF-8 (byte {err.start})") from None
