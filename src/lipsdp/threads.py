"""How many BLAS / torch threads a bound may use, and a context that enforces it.

Why: the LMI methods run many dense kernels on matrices of a few hundred rows. With several BLAS threads
on a busy machine (other processes on every core), OpenBLAS's threads wait for each other and a 1-second
solve can take 40. One thread is never more than a few times slower than the machine's best on these
sizes and degrades gracefully under load, so small problems always get one; large ones get the cores
that the load average says are free.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

# LMI size (sum of the widths but the output) and widest block from which extra threads pay for themselves
# (measured on 2 cores, neuron: width 500 [784,500x3,10] 90 -> 73 s with 2 threads; width 256
# mnistfc_256x4 23 -> 29 s and width 50 [50,50x20,10] slower too: small blocks' kernels do not scale).
PARALLEL_FROM = 1200
PARALLEL_WIDTH = 400
# Set (e.g. by the parallel runner, one thread per task) to fix the thread count of every bound.
ENV_VAR = "LIPSDP_THREADS"


def threads_for(size: int, requested: int | None = None, width: int | None = None) -> int:
    """Threads for a problem whose LMI has `size` rows: `requested` if given (>= 1), else $LIPSDP_THREADS
    if set, else 1 for small problems (or, given `width`, LMIs whose widest block is narrow) and, for large
    ones, the cores that other work does not keep busy (`busy_elsewhere`)."""
    if requested is not None:
        return max(1, int(requested))
    if os.environ.get(ENV_VAR, "").strip().isdigit():
        return max(1, int(os.environ[ENV_VAR]))
    if size < PARALLEL_FROM or (width is not None and width < PARALLEL_WIDTH):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, int(cores - busy_elsewhere() + 0.5)))


def threads_for_sizes(sizes: Sequence[int], requested: int | None = None) -> int:
    """`threads_for` the LMI of a chain with these layer sizes (input, hidden..., output): its blocks are
    the hidden widths and the input width, reduced to the first hidden width when wider (the LMI methods
    replace W_0 by its thin-QR factor)."""
    sizes = [int(s) for s in sizes]
    blocks = [min(sizes[0], sizes[1])] + sizes[1:-1] if len(sizes) > 2 else sizes[:1]
    return threads_for(sum(blocks), requested, width=max(blocks))


def busy_elsewhere() -> float:
    """How many cores other work keeps busy now. On Linux: the tasks runnable at this instant
    (/proc/stat procs_running) minus this process's own, which reacts at once when a neighbour starts or
    ends (the 1-minute load average still counts a job that ended seconds ago, and would hand a quiet
    machine one thread). Elsewhere: the 1-minute load average."""
    try:
        with open("/proc/stat") as stat:
            running = next(int(line.split()[1]) for line in stat if line.startswith("procs_running"))
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    own += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except OSError:  # the thread ended meanwhile
                continue
        return float(max(0, running - own))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 0.0


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
