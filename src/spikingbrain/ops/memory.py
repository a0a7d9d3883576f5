"""Freed memory kept for reuse on CPU (glibc): a prefill allocates and frees the same large activations in every layer.

glibc's malloc serves large blocks by ``mmap`` and returns them on ``free``, so the next block of that size starts on
fresh pages, each a page fault (zeroed by the kernel). Its threshold for that grows on its own as large blocks are
freed, so a process's first prefills pay most: here, a 4k prefill of the W8ASpike integer path took 536k page faults
(1.2 s of system time) on its first timed run and 3-100k on later ones. :func:`keep_freed_memory` fixes the
threshold at glibc's largest (32 MiB) and trims the heap only when more than ``trim_bytes`` lie free at its top, so
blocks up to 32 MiB are reused from the first prefill on. The price: memory a prefill freed stays with the process (up
to ``trim_bytes``) instead of going back to the system. ``load_model`` calls it for CPU models unless
``SPIKINGBRAIN_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import functools
import os

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD_BYTES"]

#: glibc's largest mmap threshold on 64-bit systems (blocks above it are always mapped and unmapped)
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def _mallopt():
    """glibc's ``mallopt``, or None on another C library."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory(trim_bytes: int = 1 << 30) -> bool:
    """Keep freed blocks up to :data:`MMAP_THRESHOLD_BYTES` for reuse (module docstring); False where this is not glibc,
    or ``SPIKINGBRAIN_KEEP_FREED_MEMORY=0`` turns it off."""
    mallopt = _mallopt()
    if mallopt is None or os.environ.get("SPIKINGBRAIN_KEEP_FREED_MEMORY", "1").strip() == "0":
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, min(trim_bytes, 2**31 - 1)))
