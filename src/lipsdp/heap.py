"""Keep freed memory in the process while the interior-point method runs (`methods.sdp` wraps the solver,
its certificates and candidates), so that large temporaries are reused instead of page-faulted in afresh.

Why: the LMI methods allocate arrays of tens to hundreds of MiB many times per iteration (products with
U, the Schur complement matrix, dense solves). glibc serves each from a fresh mmap and returns it to the
system when freed, so every allocation pays one page fault per 4 KiB and the kernel's zeroing: measured
on [784,500x3,10] `neuron` (2 cores), 20 interior-point iterations took 56 s this way and 43 s with the
heap kept. Inside `retained_heap()` large requests come from the heap (glibc `mallopt`: no mmap, no
trimming); on exit the defaults come back and `malloc_trim(0)` hands the memory back, so the process is
as lean afterwards as before. Elsewhere than glibc it does nothing. Numbers are unchanged: only where
memory comes from moves. Only for code whose temporaries repeat in size from one iteration to the next:
`anytime` (torch tensors of many sizes) fragmented such a heap to 5.3 GB peak on the same net.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# glibc mallopt parameters (malloc.h) and their documented defaults
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536

_lock = threading.Lock()
_depth = 0


def _libc():
    """glibc's mallopt and malloc_trim, or None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


@contextmanager
def retained_heap() -> Iterator[None]:
    """Run the body with large allocations served from a heap that keeps freed memory (nested and
    concurrent uses share one setting; the last to leave restores glibc's defaults and trims)."""
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(M_MMAP_MAX, 0)
            _LIBC.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                _LIBC.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)
