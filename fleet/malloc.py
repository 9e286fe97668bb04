"""Keep large freed blocks in the process instead of handing them back to the OS at once.

A streaming process (the edge's streamer, the gateway) allocates and frees a few hundred kB per
message: a 4-chunk low-dim message is ~425 kB, and protobuf's encoder (``SerializeToString``,
``ByteSize``) grows its buffer past glibc's thresholds. With glibc's defaults such a block is
``mmap``-ed (or the heap's top trimmed when it is freed), so every message faults fresh pages in
again: on the development VM ``ByteSize``/``SerializeToString`` of that message took ~0.9-2 ms
instead of ~60 us (``bench/ingest.py``; a page fault costs a VM far more than a copy).

:func:`keep_freed_memory` raises ``M_MMAP_THRESHOLD`` (blocks up to it come from the heap) and
``M_TRIM_THRESHOLD`` (free heap kept before trimming): the process holds up to
``trim_bytes`` of freed memory for reuse. glibc on Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20
"""Blocks up to this size come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_BYTES = 64 << 20
"""Free memory at the heap's top kept for reuse before it is returned to the OS."""

_done = False


def keep_freed_memory(mmap_bytes: int = MMAP_BYTES, trim_bytes: int = TRIM_BYTES) -> bool:
    """Set the thresholds once per process; True if glibc took them (False: not glibc, nothing changed)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, trim_bytes))
    if not ok:
        log.debug("mallopt refused the thresholds (%d, %d)", mmap_bytes, trim_bytes)
    _done = ok
    return ok
