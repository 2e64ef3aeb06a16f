"""Run one benchmark task in a fresh spawned process: its peak memory is its own, and a task past its
time limit (or one that dies) is reported as None instead of stalling the table."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import time
from collections.abc import Callable
from typing import Any


def run_spawned(target: Callable[..., None], args: tuple, timeout: float) -> Any:
    """target(*args, queue) in a spawned process; returns what it puts on the queue, or None when it
    dies without an answer or is still running after `timeout` seconds (then it is killed)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < timeout:
            try:
                return queue.get(timeout=1.0)
            except queue_module.Empty:
                if not proc.is_alive():  # died without an answer (the child printed its error)
                    return None
        return None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
