"""Interruption and repeatability of the `lipsdp estimate` command.

Ctrl-C (SIGINT) during a multi-model run must end cleanly with exit code 130 and a one-line message,
keeping the JSON lines of every model that finished before the interrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES

from lipsdp import Network
from lipsdp.io.arrays import save_npz

CLI = [sys.executable, "-c", "from lipsdp.cli import main; main()"]


def _slow_model(path: Path) -> None:
    """A net whose lower-bound search takes many seconds (wide input, many ascent steps in --lower)."""
    rng = np.random.default_rng(0)
    save_npz(
        Network.from_arrays(
            [rng.standard_normal((60, 300)), rng.standard_normal((60, 60)), rng.standard_normal((10, 60))],
            "tanh",
        ),
        path,
    )


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


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_sigint_keeps_finished_results(tmp_path):
    slow = tmp_path / "slow.npz"
    _slow_model(slow)
    out = tmp_path / "results.jsonl"
    fast = EXAMPLES / "tanh_controller.npz"
    cmd = CLI + ["estimate", str(fast), str(slow), str(slow), "-m", "naive", "--lower", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and out.read_text().strip()):
        time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)  # well inside the slow model's lower-bound search
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted after 1 of 3 models" in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["model"] == str(fast)


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
