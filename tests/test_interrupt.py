"""Interruption and repeatability of the `lipsdp estimate` command.

Ctrl-C (SIGINT) during a multi-model run must end cleanly with exit code 130 and a one-line message,
keeping the JSON lines of every model that finished before the interrupt."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXAMPLES

CLI = [sys.executable, "-c", "from lipsdp.cli import main; main()"]
# Python's usual Ctrl-C handler, whatever this process inherited: a shell that starts the test suite in the
# background (`pytest &`, nohup) leaves SIGINT ignored, and Python then keeps it ignored.
CLI_WITH_CTRL_C = [sys.executable, "-c", ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "from lipsdp.cli import main; main()")]


def test_out_writes_one_json_line_per_model(tmp_path):
    out = tmp_path / "results.jsonl"
    models = [EXAMPLES / "tanh_controller.npz", EXAMPLES / "relu_2-10-30-20-2.npz"]
    proc = subprocess.run(
        CLI + ["estimate", *map(str, models), "-m", "sequential", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model"] for r in rows] == [str(m) for m in models]
    assert all(r["verified"] and r["upper"] > 0 for r in rows)


def _wait_for_line(path: Path, proc: subprocess.Popen, deadline_s: float = 120.0) -> None:
    """Poll until `path` holds a complete line (with a deadline, in case the CLI never writes one)."""
    deadline = time.monotonic() + deadline_s
    while not (path.exists() and path.read_text().endswith("\n")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no result line before the deadline"
        time.sleep(0.01)  # poll interval until the deadline; no assumption on how long the CLI takes


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX signals and named pipes")
@pytest.mark.parametrize("suffix", [".npz", ".mat"], ids=["in-process", "isolated-loader"])
def test_sigint_keeps_finished_results(tmp_path, suffix):
    """Synchronised on events, not sleeps: the second model is a named pipe nobody writes to, so its
    loader blocks until the SIGINT, which is sent only once the first model's JSON line is in --out.
    A .mat file is read in a child process (lipsdp.io.isolation): Ctrl-C must not leave that child behind."""
    blocked = tmp_path / f"blocked{suffix}"
    os.mkfifo(blocked)
    out = tmp_path / "results.jsonl"
    fast = EXAMPLES / "tanh_controller.npz"
    cmd = CLI_WITH_CTRL_C + ["estimate", str(fast), str(blocked), "-m", "naive", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(out, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted after 1 of 2 models" in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["model"] == str(fast)
    # No process still has the pipe open for reading (a left-over loader would): opening the write end
    # without blocking then fails with ENXIO.
    with pytest.raises(OSError) as info:
        os.close(os.open(blocked, os.O_WRONLY | os.O_NONBLOCK))
    assert info.value.errno == errno.ENXIO


def test_cli_repeatable(tmp_path):
    """Same inputs and seed: the same JSON numbers, run to run (different processes)."""
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.jsonl"
        subprocess.run(
            CLI
            + [
                "estimate",
                str(EXAMPLES / "tanh_controller.npz"),
                "-m",
                "sequential",
                "--lower",
                "--seed",
                "7",
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        row = json.loads(out.read_text())
        outs.append((row["upper"], row["lower"], row["raw"]))
    assert outs[0] == outs[1]
