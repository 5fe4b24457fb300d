"""The process's memory allocator: keep glibc from hoarding freed tensor memory.

glibc serves blocks above its mmap threshold with ``mmap`` and returns them to the OS on free, but
every time such a block is freed it raises the threshold to that block's size ("dynamic threshold").
From then on, blocks of that size come from the heap, where tensors of many different sizes freed and
re-allocated step after step fragment it, and the resident set only grows. A frozen search (many
[out, in] temporaries per step) reached 4.0 GiB of peak RSS after 16 steps instead of 1.3 GiB
(``scripts/bench_allocator.py``). Fixing the threshold, as ``MALLOC_MMAP_THRESHOLD_`` would at
process start, switches the dynamic adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
_M_MMAP_THRESHOLD = -3
#: glibc's own initial threshold: blocks of 128 KiB and more are mmapped and given back when freed.
MMAP_THRESHOLD_BYTES = 128 * 1024


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold; True if it was set. A no-op off glibc or when the user set it."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
