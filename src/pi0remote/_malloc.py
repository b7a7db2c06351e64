"""Keep glibc from handing 150 KB message buffers back to the kernel after every call.

Each request allocates a few buffers of about the camera frame's size. glibc serves blocks over its
mmap threshold (128 KiB by default) with a fresh ``mmap`` and trims the heap top above 128 KiB, so every
call page-faults its buffers in again: measured here, a msgpack encode+decode round trip of the canonical
request took 83 µs with the defaults and 21 µs with the thresholds below (docs/decisions.md;
``benchmarks/malloc_tuning.py``).
Raising them costs at most tens of MB of retained heap. Set ``PI0REMOTE_MALLOC_TUNING=0`` to leave
the process's allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when applied."""
    global _done
    if _done:
        return True
    if os.environ.get("PI0REMOTE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    return _done
