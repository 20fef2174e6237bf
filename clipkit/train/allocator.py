"""Freed CPU memory stays in the process while training: steps stop re-faulting their pages.

glibc's malloc gives large blocks back to the kernel as soon as they are freed (blocks above the
mmap threshold are unmapped, the heap's free top is trimmed), so every training step allocates
its activations and gradients on fresh pages, and the kernel zeroes each 4 KiB page again on
first touch (a minor page fault). Measured on the 2-core CPU machine (``bench/ssl_step_profile.py
--processes``, ResNet-18 with the CIFAR stem at batch 128, each step alone in its process):
with glibc's defaults a SimCLR step took 5.31 s and 0.71 million page faults, a MoCo v2 step
6.65 s and 0.69 million; with freed memory kept, 4.41 s and 11 thousand, 5.92 s and 2 thousand
(1.20x and 1.12x faster). How many pages a step faults depends on the heap's history (what the
process imported and allocated before), which is why the same step ran at different speeds in
clipkit's trainer and in lightly's plain loop (5.04 s, 0.50 million faults for SimCLR there).

The cost: the process keeps its peak heap until the context exits (as a GPU caching allocator
does), so resident memory stays near the peak of a step instead of falling between steps; it
plateaus (a 20-step MoCo run at batch 128 held 2,674 MB from step 2 to 20).
``train.keep_freed_memory=false`` leaves glibc's defaults. Other C libraries (musl) and other
systems are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

# mallopt parameters (malloc.h) and glibc's defaults, restored on exit.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """glibc's ``libc``, or None (another system or C library: nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # mallopt and malloc_trim are glibc's; musl has neither.
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the context, freed memory is reused by the process, never returned to the kernel.

    Every allocation comes from the heap (``M_MMAP_MAX`` 0) and its free top is never trimmed
    (``M_TRIM_THRESHOLD`` at its maximum); processes forked inside (loader workers) inherit
    it. On exit glibc's default values come back and the free heap is returned
    (``malloc_trim``); glibc's dynamic mmap threshold stays off for the rest of the process (any
    ``mallopt`` call turns it off, and nothing turns it back on).

    Args:
        enabled: False: a no-op context (``train.keep_freed_memory=false``).

    Yields:
        Whether the allocator was tuned (False off glibc or when disabled).
    """
    libc = _glibc() if enabled else None
    tuned = bool(libc) and (
        libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
    )
    try:
        yield tuned
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
