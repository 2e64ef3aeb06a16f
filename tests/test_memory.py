"""The memory guard of the dense LMI methods (lipsdp.memory): the block count is the LMI's, an
eliminated wide layer is not counted, and a method whose blocks cannot fit is one clear LipSDPError
(the naive product still runs), from the API and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import he_network
from typer.testing import CliRunner

import lipsdp
from lipsdp import memory
from lipsdp.cli import app
from lipsdp.io.arrays import save_npz


def test_block_entries_count_the_lmi_blocks():
    net = he_network([5, 7, 3, 2], seed=0)
    assert memory.block_entries(net) == 5 * 5 + 7 * 7 + 3 * 3 + 5 * 7 + 7 * 3


def test_an_eliminated_wide_layer_is_not_counted():
    rng = np.random.default_rng(0)
    net = lipsdp.Network.from_arrays([rng.standard_normal((2048, 6)), rng.standard_normal((3, 2048))])
    assert memory.block_entries(net) == 9 * 9 + 2048 * 9  # the reduced matrix and the weights, no 2048^2


def test_only_sequential_and_anytime_are_estimated_on_the_reduced_lmi(monkeypatch):
    """Wide ReLU layers eliminated (`lipsdp.reduced`) shrink the estimate of sequential and anytime only
    (both run on the reduced LMI there): the other dense methods optimise the full LMI and are refused where
    it cannot fit."""
    from lipsdp import reduced

    monkeypatch.setattr(reduced, "MIN_WIDTH", 1)
    net = he_network([4, 60, 3, 2], seed=2)
    assert reduced.plan(net) == (1,)
    full, kept = memory.block_entries(net, reduces=False), memory.block_entries(net)
    assert kept == 16 + 9 + 12 < full
    monkeypatch.setenv("LIPSDP_MEMORY_GIB", str(memory.PEAK_FACTOR * 8.0 * (kept + full) / 2 / 2**30))
    memory.check_fits(net, "sequential")
    memory.check_fits(net, "anytime")
    for method in ("layer", "neuron"):
        with pytest.raises(lipsdp.LipSDPError, match="widest layer: 60 neurons"):
            memory.check_fits(net, method)


@pytest.mark.parametrize("method", ["sequential", "anytime", "layer", "neuron"])
def test_a_method_that_cannot_fit_is_refused_clearly(method, monkeypatch):
    net = he_network([20, 30, 10, 2], seed=1)
    monkeypatch.setenv("LIPSDP_MEMORY_GIB", "1e-6")  # ~1 KiB: far below 4 x 8 bytes x 1840 entries
    with pytest.raises(lipsdp.LipSDPError, match=r"would need about .*widest layer: 30 neurons, layer 1"):
        lipsdp.estimate(net, method=method)
    naive = lipsdp.estimate(net, method="naive").upper
    monkeypatch.setenv("LIPSDP_MEMORY_GIB", "1")
    assert lipsdp.estimate(net, method="sequential").upper <= naive * (1 + 1e-12)


def test_the_cli_reports_the_refusal(tmp_path, monkeypatch):
    path = tmp_path / "net.npz"
    save_npz(he_network([20, 30, 10, 2], seed=1), path)
    monkeypatch.setenv("LIPSDP_MEMORY_GIB", "1e-6")
    res = CliRunner().invoke(app, ["estimate", str(path), "--method", "sequential"])
    assert res.exit_code != 0 and "method 'sequential' would need about" in res.output
    assert "Traceback" not in res.output


def test_a_bad_memory_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LIPSDP_MEMORY_GIB", "lots")
    with pytest.raises(lipsdp.LipSDPError, match="LIPSDP_MEMORY_GIB must be a number"):
        lipsdp.estimate(he_network([3, 4, 2], seed=0), method="sequential")


def test_the_interior_point_is_estimated_by_its_dense_working_set(monkeypatch):
    """`neuron` and `layer` (the structured interior point) hold n x n, n x K and K x K matrices (n the LMI's
    order, K = n_0 + 2 x neurons), far more than the LMI's blocks: refused where those cannot fit, with a
    pointer to the first-order methods, while `sequential` still runs."""
    net = he_network([6, 30, 20, 3], seed=3)
    n, k = 6 + 30 + 20, 6 + 2 * 50
    assert memory.ipm_entries(net) == memory.IPM_SQUARES * n * n + 3 * n * k + 3 * k * k
    wide_input = he_network([40, 30, 20, 3], seed=3)  # the solver cuts the input block to 30 (thin QR)
    n, k = 30 + 30 + 20, 30 + 2 * 50
    assert memory.ipm_entries(wide_input) == memory.IPM_SQUARES * n * n + 3 * n * k + 3 * k * k
    blocks = memory.PEAK_FACTOR * 8.0 * memory.block_entries(net, reduces=False)
    ipm = memory.IPM_PEAK_FACTOR * 8.0 * memory.ipm_entries(net)
    assert blocks < ipm
    monkeypatch.setenv("LIPSDP_MEMORY_GIB", str((blocks + ipm) / 2 / 2**30))
    for method in ("neuron", "layer"):
        refusal = "interior point's dense matrices.*'sequential' / 'anytime'"
        with pytest.raises(lipsdp.LipSDPError, match=refusal):
            lipsdp.estimate(net, method=method)
    memory.check_fits(net, "sequential")
    memory.check_fits(net, "anytime")
