"""How many BLAS / torch threads a bound may use, and a context that enforces it.

Why: the LMI methods run many dense kernels on matrices of a few hundred rows. With several BLAS threads
on a busy machine (other processes on every core), OpenBLAS's threads wait for each other and a 1-second
solve can take 40. One thread is never more than a few times slower than the machine's best on these
sizes and degrades gracefully under load, so small problems always get one; large ones get the cores
that the load average says are free.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# LMI size (sum of the widths but the output) from which extra threads pay for themselves.
PARALLEL_FROM = 1200
# Set (e.g. by the parallel runner, one thread per task) to fix the thread count of every bound.
ENV_VAR = "LIPSDP_THREADS"


def threads_for(size: int, requested: int | None = None) -> int:
    """Threads for a problem whose LMI has `size` rows: `requested` if given (>= 1), else $LIPSDP_THREADS
    if set, else 1 for small problems and, for large ones, the cores not busy according to the 1-minute
    load average."""
    if requested is not None:
        return max(1, int(requested))
    if os.environ.get(ENV_VAR, "").strip().isdigit():
        return max(1, int(os.environ[ENV_VAR]))
    if size < PARALLEL_FROM:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


@contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """Run the body with at most `threads` BLAS/OpenMP threads and torch intra-op threads."""
    from threadpoolctl import threadpool_limits

    torch = _loaded_torch()
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def _loaded_torch():
    """torch if it is already imported (importing it just to set threads costs a second)."""
    import sys

    return sys.modules.get("torch")
