"""Solver failures: time limits, failed / infeasible / inaccurate statuses, a missing solver, and problems
too large for the dense CVXPY path. Each is reported clearly, and a verified bound is still returned
wherever one exists (from the layer-by-layer multipliers when the solver gives nothing usable)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLES, he_network

import lipsdp
from lipsdp import Network, SolverError
from lipsdp.lower import lower_bound


@pytest.fixture(scope="module")
def net() -> Network:
    return he_network([2, 10, 12, 2], 0)


@pytest.fixture(scope="module")
def reference(net):
    """Layer bound solved to optimality, and a true lower bound."""
    return lipsdp.estimate(net, "layer", solver="clarabel").upper, lower_bound(
        net, samples=128, steps=20
    ).value


@pytest.mark.parametrize("solver", ["clarabel", "scs"])
def test_time_limit_still_gives_a_verified_bound(net, reference, solver):
    optimal, lower = reference
    res = lipsdp.estimate(net, "layer", solver=solver, time_limit=1e-12)  # no solve is that fast
    assert res.verified and np.isfinite(res.upper)
    assert res.upper >= optimal * (1 - 1e-6) and res.upper >= lower
    assert res.status != "optimal"
    assert any("status" in n for n in res.notes)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_time_limit_is_refused(net, bad):
    with pytest.raises(SolverError, match="time_limit"):
        lipsdp.estimate(net, "layer", solver="clarabel", time_limit=bad)


def test_lmi_too_large_is_refused_before_building():
    big = lipsdp.load_network(EXAMPLES / "mnist_784-50-10.npz")
    with pytest.raises(SolverError, match="834 x 834.*sequential"):
        lipsdp.estimate(big, "neuron-dense", solver="clarabel")
    # The advice works: sequential bounds the same net without an SDP.
    assert lipsdp.estimate(big, "sequential").upper <= lipsdp.estimate(big, "naive").upper * (1 + 1e-6)


def test_size_limit_can_be_overridden(net):
    with pytest.raises(SolverError, match="max_lmi_size"):
        lipsdp.estimate(net, "neuron-dense", solver="clarabel", max_lmi_size=10)
    assert lipsdp.estimate(net, "neuron-dense", solver="clarabel", max_lmi_size=10_000).verified


def test_mosek_without_licence_is_a_clear_error(net):
    try:
        from lipsdp.solvers import cvxpy_solver

        cvxpy_solver("mosek")
        pytest.skip("a licensed MOSEK is available here")
    except SolverError:
        pass
    with pytest.raises(SolverError, match="mosek"):
        lipsdp.estimate(net, "layer", solver="mosek")


def _fake_solve(status: str, raise_error: bool = False):
    import cvxpy as cp

    def solve(self, *args, **kwargs):
        if raise_error:
            raise cp.error.SolverError("simulated crash")
        self._status = status
        for v in self.variables():
            v.value = None

    return solve


@pytest.mark.parametrize("status", ["infeasible", "unbounded", "solver_error"])
@pytest.mark.parametrize("method", ["layer", "neuron-dense"])
def test_failed_solver_falls_back_to_a_verified_bound(monkeypatch, status, method):
    """f(x) = W1 relu(x): L = ||W1|| (closed form). With a solver that crashes or claims infeasibility, the
    result is still a verified bound >= the truth, and the status/notes say what happened."""
    import cvxpy as cp

    monkeypatch.setattr(cp.Problem, "solve", _fake_solve(status, raise_error=status == "solver_error"))
    w1 = np.random.default_rng(1).standard_normal((3, 4))
    res = lipsdp.estimate(Network.from_arrays([np.eye(4), w1]), method, solver="clarabel")
    truth = np.linalg.norm(w1, 2)
    assert res.verified and truth <= res.upper <= 4 * truth
    assert res.status == status
    assert any("layer-by-layer" in n for n in res.notes)
