"""Process memory settings the streaming metrics rely on."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: glibc's mallopt parameter for the mmap threshold.
_M_MMAP_THRESHOLD = -3
#: Blocks from this size up are mmapped, and returned to the system when freed.
MMAP_THRESHOLD = 1 << 20


@functools.cache
def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at :data:`MMAP_THRESHOLD` (once per process; no-op elsewhere).

    glibc raises the threshold (up to 32 MiB) each time a large mmapped block is freed, so later
    batch-sized transients (sorted keys, indices: tens of MB per batch at 720x1280) come from the
    heap. Metrics that keep small per-image summaries allocate between those transients, which pins
    the heap: resident memory grew 1.5-8 MB per 720x1280 image although nothing large was kept.
    A fixed threshold keeps large transients out of the heap. Returns whether it was set.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (no mallopt)
        return False
