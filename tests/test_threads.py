"""The thread rule: small problems get one thread, large ones the cores that other work leaves free, seen at
once (not through a load average that still counts a job that ended a minute ago)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lipsdp.threads import PARALLEL_FROM, busy_elsewhere, threads_for

BUSY = "import sys; print('busy', flush=True); sys.stdin.close()\nwhile True: pass"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def test_requested_and_environment_win(monkeypatch):
    assert threads_for(10**6, 3) == 3
    assert threads_for(10, 0) == 1
    monkeypatch.setenv("LIPSDP_THREADS", "2")
    assert threads_for(10**6) == 2


def test_small_problems_get_one_thread(monkeypatch):
    monkeypatch.delenv("LIPSDP_THREADS", raising=False)
    assert threads_for(PARALLEL_FROM - 1) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_busy_neighbours_are_seen_at_once(monkeypatch):
    """With as many busy-looping processes as cores (each has said it is running), a large problem gets
    one thread; their count shows in busy_elsewhere while they run."""
    monkeypatch.delenv("LIPSDP_THREADS", raising=False)
    n = cores()
    procs = [
        subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "busy"  # synchronise on the child's own word
        assert busy_elsewhere() >= n - 0.5
        assert threads_for(10**6) == 1
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_lmi_blocks_decide(monkeypatch):
    """The rule looks at the LMI actually solved: a wide input is reduced to the first hidden width, and
    narrow blocks (whose kernels do not scale) get one thread however many there are."""
    from lipsdp import threads

    monkeypatch.delenv("LIPSDP_THREADS", raising=False)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    assert threads.threads_for_sizes([784, 256, 256, 256, 256, 10]) == 1  # 1280 rows, width 256
    assert threads.threads_for_sizes([50] + [50] * 40 + [10]) == 1  # 2050 rows, width 50
    assert threads.threads_for_sizes([784, 300, 10]) == 1  # 600 rows once reduced
    assert threads.threads_for_sizes([784, 500, 500, 500, 10]) == cores()  # 2000 rows, width 500
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: float(cores()))
    assert threads.threads_for_sizes([784, 500, 500, 500, 10]) == 1
