"""Keep the C allocator from handing a training step's memory back to the kernel after every step.

glibc's malloc serves large blocks (a batch's activations: megabytes each) with mmap and returns freed
memory at the top of the heap to the kernel. A CPU training or embedding loop allocates and frees the
same large tensors every step, so it pays page faults for fresh zeroed pages again and again: on 2 CPU
cores that is a tenth to a fifth of the demo's training step (benchmarks/bench_allocator.py). A fixed mmap
threshold and a large trim threshold keep those blocks in the heap for the next step. The cost is
memory the process keeps after a peak, bounded by the trim threshold.

Only the batch loops set it (training, and `iter_embedded` under index, eval and the demo), not a
server: a threaded process could keep up to the trim threshold in each of its allocator arenas.
`FASHION_SEARCH_MALLOC=system` leaves the allocator as the C library set it (to compare, or where the
memory matters more). Other C libraries (musl, macOS) have no mallopt: nothing is changed there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

ENV = "FASHION_SEARCH_MALLOC"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest fixed mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): blocks below it come
# from the heap and are reused; setting it also stops glibc's own threshold from moving.
MMAP_THRESHOLD = 32 * 2**20
# Freed memory the heap keeps for the next step instead of returning it to the kernel.
TRIM_THRESHOLD = 256 * 2**20

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; True when they are in effect. Safe to call repeatedly."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice not in ("tuned", "system"):
        log.warning("%s=%r is not 'tuned' or 'system'; using 'tuned'", ENV, choice)
    if choice == "system":
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 for a value it refuses.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _glibc_mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError when this C library is not glibc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
