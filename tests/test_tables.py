"""CLI tables never cut a number: in any width (and in a pipe) every bound is printed in full, 6 significant
digits with its exponent, exactly as the --json value formatted the same way; labels fold instead."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import EXAMPLES, he_network
from rich.console import Console
from typer.testing import CliRunner

import lipsdp
from lipsdp import Network
from lipsdp.cli import Column, app, print_table
from lipsdp.io.arrays import save_npz

WIDTHS = ["40", "60", "120"]


def _fmt(x, digits=6) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A net with a bound near 3e6 (an exponent in the table) under a long file name, and a bundled one."""
    folder = tmp_path_factory.mktemp("a_rather_long_folder_name_for_the_models")
    net = he_network([6, 12, 12, 3], seed=0)
    big = Network.from_arrays([w * 60 for w in net.weights], "relu")
    path = folder / "a_model_with_a_really_quite_long_descriptive_file_name.npz"
    save_npz(big, path)
    return [path, EXAMPLES / "relu_2-10-30-20-2.npz"]


def _invoke(args: list[str], width: str):
    res = CliRunner().invoke(app, args, env={"COLUMNS": width})
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.fixture(scope="module")
def estimate_json(models):
    return json.loads(_invoke(["estimate", *map(str, models), "-m", "sequential", "--lower", "--json"], "80"))


@pytest.fixture(scope="module")
def compare_json(models):
    return json.loads(_invoke(["compare", str(models[0]), "-m", "naive", "-m", "layer", "--json"], "80"))


@pytest.mark.parametrize("width", WIDTHS)
def test_estimate_table_keeps_every_bound(models, estimate_json, width):
    """Same seed, same numbers: the table of the same run as the --json one shows each value whole."""
    data = estimate_json
    text = _invoke(["estimate", *map(str, models), "-m", "sequential", "--lower"], width)
    assert "…" not in text and "..." not in text
    assert any("e+" in _fmt(d["upper"]) for d in data)  # the case that used to be cut
    for d in data:
        for value in (_fmt(d["upper"]), _fmt(d["lower"]), _fmt(d["raw"]), _fmt(d["ratio"], 4)):
            assert value in text, (value, text)


@pytest.mark.parametrize("width", ["40", "60"])
def test_compare_table_keeps_every_bound(models, compare_json, width):
    data = compare_json
    text = _invoke(["compare", str(models[0]), "-m", "naive", "-m", "layer"], width)
    assert "…" not in text
    for d in data:
        assert d["method"] in text
        for value in (_fmt(d["upper"]), _fmt(d["lower"]), _fmt(d["ratio"], 4)):
            assert value in text, (value, text)


@pytest.mark.parametrize("width", ["40", "60"])
def test_certify_table_keeps_every_number(tmp_path, width):
    net = he_network([2, 8, 3], seed=1)
    model = tmp_path / "classifier_with_a_long_name_to_squeeze_the_title.npz"
    save_npz(net, model)
    x = np.random.default_rng(0).standard_normal((20, 2))
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=net.forward(x).argmax(axis=1))
    args = ["certify", str(model), str(data), "--radii", "0.0123456", "0.25", "-m", "sequential"]
    result = json.loads(_invoke([*args, "--json"], width))
    text = _invoke(args, width)
    assert "…" not in text
    for radius, accuracy in result["certified_accuracy"].items():
        assert radius in text and f"{accuracy:.4f}" in text


@pytest.mark.parametrize("width", ["40", "60"])
def test_methods_table_keeps_every_name(width):
    from lipsdp.methods import available_methods

    text = _invoke(["methods"], width)
    assert "…" not in text
    for name in available_methods():
        assert name in text


def test_more_columns_never_cut_a_number():
    """Robust to columns added later (e.g. a proven SDP lower bound and a gap): every width from 20 to 200."""
    columns = [Column("model", fold=True, justify="left"), Column("method")] + [
        Column(h) for h in ("upper (verified)", "lower", "upper/lower", "sdp lower (proven)", "gap", "raw",
                            "seconds", "peak MiB")
    ]
    rows = [
        ["some/long/path/model_a.onnx", "neuron-dense", "2.87869e+06", "36.4822", "78907.1", "2.87868e+06",
         "3.47e-06", "2.87869e+06", "123.45", "1024.0"],
        ["b.npz", "naive", "1.23457e-300", "-", "-", "-", "-", "1.23457e-300", "0.00", "0.1"],
    ]
    for width in range(20, 201):
        buf = io.StringIO()
        print_table(columns, rows, title="a title (lower bound 36.4822)", target=Console(file=buf, width=width))
        text = buf.getvalue()
        assert "…" not in text
        for row in rows:
            for cell in row[1:]:
                assert cell in text, (width, cell, text)
        if "model:" not in text:  # a table (not the one-block-per-row form) fits the width exactly
            assert max(len(line) for line in text.splitlines()) <= width, (width, text)


def test_pipe_with_narrow_columns():
    """The real command in a pipe (not a terminal), 40 columns: the bound is whole."""
    path = str(EXAMPLES / "relu_2-10-30-20-2.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "lipsdp", "estimate", path, str(EXAMPLES / "tanh_controller.npz"), "-m", "naive"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "COLUMNS": "40"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{lipsdp.estimate(path, 'naive').upper:.6g}" in proc.stdout
    assert "…" not in proc.stdout
