"""The scalable paths agree with the dense CVXPY formulation (correctness, never wall time)."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np
import pytest
from conftest import he_network

import lipsdp
from lipsdp.certificate import certify as prove
from lipsdp.io.arrays import save_npz
from lipsdp.methods.ipm import solve_lipsdp_ipm


def _mixed_net(seed: int) -> lipsdp.Network:
    rng = np.random.default_rng(seed)
    sizes = [3, 6, 5, 4, 2]
    weights = [rng.normal(0, 1.0, size=(b, a)) for a, b in pairwise(sizes)]
    return lipsdp.Network.from_arrays(weights, ["tanh", "leaky_relu:0.2", "sigmoid"])


NETS = {
    "relu-deep": lambda: he_network([4, 8, 8, 8, 8, 3], seed=1),
    "relu-wide": lambda: he_network([6, 20, 20, 2], seed=2),
    "mixed": lambda: _mixed_net(3),
    "one-hidden": lambda: he_network([5, 7, 4], seed=4),
}


@pytest.mark.parametrize("name", NETS)
def test_structured_ipm_matches_dense_cvxpy(name):
    net = NETS[name]()
    for fast, dense in (("neuron", "neuron-dense"), ("layer", "layer")):
        exact = lipsdp.estimate(net, fast)
        ref = lipsdp.estimate(net, dense, solver="clarabel")
        assert exact.solver == "lipsdp-ipm" and ref.solver == "clarabel"
        assert exact.upper == pytest.approx(ref.upper, rel=1e-4)


def test_ipm_with_per_neuron_slopes_matches_dense():
    net = he_network([3, 6, 6, 2], seed=7)
    rng = np.random.default_rng(0)
    alphas = [rng.uniform(0, 0.5, n) for n in net.hidden_sizes]
    betas = [a + rng.uniform(0, 1, a.size) for a in alphas]
    local = net.with_slopes(alphas, betas)
    assert lipsdp.estimate(local, "neuron").upper == pytest.approx(
        lipsdp.estimate(local, "neuron-dense", solver="clarabel").upper, rel=1e-4
    )


def test_ipm_time_limit_still_returns_a_verified_bound():
    net = he_network([10, 20, 20, 20, 5], seed=5)
    optimum = lipsdp.estimate(net, "neuron").upper
    early = solve_lipsdp_ipm(net, time_limit=0.0)
    assert early.status == "time_limit"
    cert = prove(net, early.multipliers)
    assert cert is not None  # every interior-point iterate is dual feasible, hence certifiable
    assert cert.upper >= optimum * (1 - 1e-9)


@pytest.mark.parametrize("name", ["relu-deep", "mixed"])
def test_anytime_within_two_percent_of_neuron(name):
    net = NETS[name]()
    neuron = lipsdp.estimate(net, "neuron").upper
    anytime = lipsdp.estimate(net, "anytime", budget=math.inf)  # stops on its step count: never on load
    assert neuron * (1 - 1e-9) <= anytime.upper <= neuron * 1.02
    assert anytime.verified


def test_sequential_between_neuron_and_naive():
    for make in NETS.values():
        net = make()
        seq = lipsdp.estimate(net, "sequential").upper
        assert lipsdp.estimate(net, "neuron").upper <= seq * (1 + 1e-9)
        assert seq <= lipsdp.estimate(net, "naive").upper * (1 + 1e-9)


def test_many_models_same_results_on_any_executor(tmp_path):
    nets = [he_network([3, 6, 6, 2], seed=s) for s in range(4)]
    serial = [r.upper for r in lipsdp.api.estimate_many(nets, "neuron")]
    pooled = [r.upper for r in lipsdp.api.estimate_many(nets, "neuron", workers=2)]
    assert pooled == serial
    finished = []
    lipsdp.api.estimate_many(nets, "sequential", on_done=lambda i, r: finished.append(i))
    assert sorted(finished) == [0, 1, 2, 3]


def test_dask_local_cluster_gives_identical_results():
    distributed = pytest.importorskip("distributed")
    nets = [he_network([3, 6, 6, 2], seed=s) for s in range(3)]
    serial = [r.upper for r in lipsdp.api.estimate_many(nets, "neuron")]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        on_dask = [r.upper for r in lipsdp.api.estimate_many(nets, "neuron", dask=cl.scheduler_address)]
        split = lipsdp.estimate(he_network([4, 8, 8, 8, 8, 3], seed=1), "neuron", split=2, dask=cl.scheduler_address)
    assert on_dask == serial
    assert split.upper == lipsdp.estimate(he_network([4, 8, 8, 8, 8, 3], seed=1), "neuron", split=2).upper


def test_dask_unreachable_is_a_clear_error():
    with pytest.raises(lipsdp.LipSDPError, match="Dask scheduler"):
        lipsdp.api.estimate_many([he_network([2, 3, 1], 0)] * 2, "naive", dask="tcp://127.0.0.1:1")


def test_compare_orders_tiers_and_plots(tmp_path):
    from typer.testing import CliRunner

    from lipsdp.cli import app

    path = tmp_path / "net.npz"
    save_npz(he_network([3, 8, 8, 2], seed=3), path)
    plot = tmp_path / "cmp.png"
    res = CliRunner().invoke(app, ["compare", str(path), "--budget", "5", "--json", "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads(res.output)}
    assert set(rows) == {"naive", "sequential", "anytime", "layer", "neuron"}
    lower = rows["neuron"]["lower"]
    assert lower <= rows["neuron"]["upper"] <= rows["layer"]["upper"] * (1 + 1e-9)
    assert rows["layer"]["upper"] <= rows["naive"]["upper"] * (1 + 1e-9)
    assert rows["sequential"]["upper"] <= rows["naive"]["upper"] * (1 + 1e-9)
    assert plot.stat().st_size > 1000


def test_compare_reports_a_refused_tier_and_runs_the_others(tmp_path):
    """neuron-dense refuses an LMI of order 520 (> its 400 limit): its row carries that error, the tiers
    after it still run, and their bounds are the ones `estimate` gives alone."""
    from typer.testing import CliRunner

    from lipsdp.cli import app

    net = he_network([300, 200, 20, 2], seed=5)
    path = tmp_path / "net.npz"
    save_npz(net, path)
    res = CliRunner().invoke(app, ["compare", str(path), "-m", "neuron-dense", "-m", "naive", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["method"] for r in rows] == ["neuron-dense", "naive"]
    assert "above the limit" in rows[0]["error"] and "upper" not in rows[0]
    assert rows[1]["upper"] == lipsdp.estimate(net, "naive").upper
    text = CliRunner().invoke(app, ["compare", str(path), "-m", "neuron-dense", "-m", "naive"])
    assert text.exit_code == 0 and "neuron-dense failed:" in text.output
    only = CliRunner().invoke(app, ["compare", str(path), "-m", "neuron-dense"])
    assert only.exit_code == 1 and "neuron-dense failed:" in only.output


@pytest.mark.slow
def test_deep_net_exact_and_first_order_agree():
    """[50, 50 x 10, 10]: the structured IPM's verified bound and the anytime bound agree to 2%, and the
    SCS dense formulation (independent solver) is not below the IPM's optimum by more than its accuracy."""
    net = he_network([50] + [50] * 10 + [10], seed=0)
    exact = lipsdp.estimate(net, "neuron")
    assert exact.status == "optimal"
    anytime = lipsdp.estimate(net, "anytime", budget=math.inf)  # steps, not seconds
    assert exact.upper * (1 - 1e-9) <= anytime.upper <= exact.upper * 1.02
    sequential = lipsdp.estimate(net, "sequential").upper
    assert exact.upper <= sequential <= lipsdp.estimate(net, "naive").upper
