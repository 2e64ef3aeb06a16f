"""Running independent pieces of work on a `concurrent.futures.Executor`.

Tasks are module-level functions of plain data (numpy arrays, Networks of arrays), so any executor works:
a local process pool (`workers=N`) or a Dask cluster (`Client(address).get_executor()`). Results come
back in submission order, whichever executor ran them. An executor passed in is never shut down here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from typing import Any


def _pin_threads() -> None:
    """Worker-process initialiser: one thread for libraries that read these variables when they start
    (e.g. Clarabel's Rayon pool); already-loaded BLAS and torch are pinned per task by `_call_pinned`."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "LIPSDP_THREADS"):
        os.environ[var] = "1"


def dask_executor(address: str) -> Executor:
    """An executor backed by an existing Dask cluster at `address` (needs the `dask` extra)."""
    from lipsdp.errors import LipSDPError

    try:
        from distributed import Client
    except ImportError:
        raise LipSDPError("Dask support needs the dask extra: pip install 'lipsdp[dask]'") from None
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise LipSDPError(f"could not connect to the Dask scheduler at {address}: {exc}") from None
    return client.get_executor()


def run_all(
    func: Callable[..., Any],
    items: Sequence[Any],
    *,
    workers: int = 1,
    executor: Executor | None = None,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Apply `func` to each item (a tuple of arguments), in parallel when asked; results in order.

    `on_done(index, result)` is called as each task finishes (for progress bars and incremental output).
    """
    items = list(items)
    if executor is None and (workers <= 1 or len(items) <= 1):
        results = []
        for i, args in enumerate(items):
            results.append(func(*args))
            if on_done:
                on_done(i, results[-1])
        return results
    own = executor is None
    if own:
        executor = ProcessPoolExecutor(max_workers=min(workers, len(items)), initializer=_pin_threads)
    futures: dict = {}
    try:
        futures = {executor.submit(_call_pinned, func, args): i for i, args in enumerate(items)}
        results: list[Any] = [None] * len(items)
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_done:
                on_done(i, results[i])
        return results
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    finally:
        if own:
            executor.shutdown(wait=True, cancel_futures=True)


def _call_pinned(func: Callable[..., Any], args: tuple) -> Any:
    """Run one task with one BLAS / torch thread, so N workers use N cores, not N^2 (Dask workers too)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = os.environ.get("LIPSDP_THREADS")
    os.environ["LIPSDP_THREADS"] = "1"  # every bound in this task: one thread (see lipsdp.threads)
    try:
        with threadpool_limits(1):
            return func(*args)
    finally:
        torch.set_num_threads(threads)
        if before is None:
            os.environ.pop("LIPSDP_THREADS", None)
        else:
            os.environ["LIPSDP_THREADS"] = before
