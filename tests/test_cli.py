"""The `lipsdp` command: JSON output, tables, and one-line errors with a non-zero exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import EXAMPLES, ORIGINAL_NEURON
from typer.testing import CliRunner

from lipsdp.cli import app

ORIGINAL = str(EXAMPLES / "relu_2-10-30-20-2.npz")
CONTROLLER = str(EXAMPLES / "tanh_controller.npz")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert message.startswith("error:")
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message


def test_json_keys_and_value():
    result = invoke("estimate", ORIGINAL, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"upper", "lower", "method", "verified", "raw", "seconds"} <= set(data)
    assert data["method"] == "neuron" and data["verified"] is True and data["lower"] is None
    assert round(data["upper"], 3) == ORIGINAL_NEURON
    assert data["upper"] >= data["raw"] * (1 - 1e-9)


def test_json_with_lower():
    result = invoke("estimate", CONTROLLER, "--method", "sequential", "--lower", "--json", "--seed", "3")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "sequential"
    assert 0 < data["lower"] <= data["upper"]


def test_several_files_give_a_list():
    result = invoke("estimate", CONTROLLER, str(EXAMPLES / "tanh_controller.mat"), "-m", "naive", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data) == 2 and data[0]["upper"] == data[1]["upper"]


def test_table_output():
    import lipsdp

    result = invoke("estimate", CONTROLLER, "--method", "naive")
    assert result.exit_code == 0, result.output
    upper = lipsdp.estimate(CONTROLLER, "naive").upper
    assert "naive" in result.stdout and f"{upper:.6g}" in result.stdout


def test_methods_command():
    result = invoke("methods")
    assert result.exit_code == 0
    for name in ("naive", "sequential", "layer", "neuron"):
        assert name in result.stdout


def test_missing_file(tmp_path):
    assert_clean_error(invoke("estimate", str(tmp_path / "nope.npz")), "not found")


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    assert_clean_error(invoke("estimate", str(path)), "junk.npz")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"x")
    assert_clean_error(invoke("estimate", str(path)), ".onnx")


def test_unknown_method():
    assert_clean_error(invoke("estimate", CONTROLLER, "--method", "fast"), "unknown method 'fast'", "neuron")


def test_network_method_refused():
    assert_clean_error(invoke("estimate", CONTROLLER, "--method", "network"), "unsound")


def test_unknown_solver():
    assert_clean_error(invoke("estimate", CONTROLLER, "--solver", "cplex"), "unknown solver")


def test_bad_workers():
    assert_clean_error(invoke("estimate", CONTROLLER, "--workers", "0"), "workers")


def test_python_m_help():
    out = subprocess.run(
        [sys.executable, "-m", "lipsdp", "--help"], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "estimate" in out.stdout


@pytest.mark.parametrize("args", [["estimate", "missing.npz"], ["estimate", CONTROLLER, "-m", "network"]])
def test_subprocess_errors_have_no_traceback(args):
    out = subprocess.run(
        [sys.executable, "-m", "lipsdp", *args], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["estimate", "compare", "certify"])
def test_load_error_names_the_file_once(tmp_path, command):
    path = tmp_path / "junk.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file, but garbage afterwards")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 2)), y=np.zeros(2, dtype=int))
    args = [command, str(path)] + ([str(data)] if command == "certify" else [])
    result = invoke(*args)
    assert_clean_error(result, "junk.mat")
    assert result.stderr.count(str(path)) == 1, result.stderr
