"""Bounding methods against independent truths: closed forms, exact region enumeration, published numbers,
and the orderings that hold between methods."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    ORIGINAL_LAYER,
    ORIGINAL_NEURON,
    ORIGINAL_NEURON_SPLIT2,
    exact_lipschitz_1d,
    exact_lipschitz_2d,
    he_network,
)

import lipsdp
from lipsdp import Network, SolverError, UnknownMethodError
from lipsdp.lower import jacobian_norms, lower_bound

METHODS = ("naive", "sequential", "layer", "neuron")
SDP = ("layer", "neuron")
REL = 1e-6


def bounds(net: Network, methods=METHODS, solver: str | None = None) -> dict[str, float]:
    return {m: lipsdp.estimate(net, m, solver=solver if m in SDP else None).upper for m in methods}


# -- one linear layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2), (6, 6)])
@pytest.mark.parametrize("method", METHODS)
def test_single_linear_layer_is_spectral_norm(shape, method):
    w = np.random.default_rng(sum(shape)).standard_normal(shape)
    truth = np.linalg.svd(w, compute_uv=False)[0]
    res = lipsdp.estimate(Network.from_arrays([w], []), method)
    assert res.verified
    assert res.upper >= truth  # a verified bound is never below the truth
    assert res.upper == pytest.approx(truth, rel=REL)


# -- closed forms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_identity_first_layer(method):
    """f(x) = W1 relu(x): the Jacobian is W1 diag(s), s in {0,1}^n, so L = ||W1||_2 (all s realised)."""
    w1 = np.random.default_rng(1).standard_normal((3, 4))
    truth = np.linalg.norm(w1, 2)
    upper = lipsdp.estimate(Network.from_arrays([np.eye(4), w1]), method).upper
    assert truth <= upper <= truth * (1 + REL)


@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_first_layer(method):
    """f(x) = W1 relu(Q x), Q orthogonal: ||W1 D Q|| = ||W1 D|| <= ||W1||, attained where Qx > 0."""
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    w1 = rng.standard_normal((2, 5))
    truth = np.linalg.norm(w1, 2)
    upper = lipsdp.estimate(Network.from_arrays([q, w1]), method).upper
    assert truth <= upper <= truth * (1 + REL)


@pytest.mark.parametrize("method", ["layer", "neuron"])
def test_absolute_value_is_tight_where_naive_is_not(method):
    """|x| = relu(x) + relu(-x): L = 1 while the naive product is sqrt(2) * sqrt(2) = 2."""
    net = Network.from_arrays([np.array([[1.0], [-1.0]]), np.array([[1.0, 1.0]])])
    assert lipsdp.estimate(net, "naive").upper == pytest.approx(2.0, rel=REL)
    upper = lipsdp.estimate(net, method).upper
    assert 1.0 <= upper <= 1.0 + REL


@pytest.mark.parametrize(
    "w0,w1,truth",
    [([[1.0], [-1.0]], [[1.0, 1.0]], 1.0), ([[1.0], [1.0], [1.0]], [[1.0, -2.0, 1.0]], 2.0)],
    ids=["abs", "hat"],
)
def test_sequential_on_degenerate_one_input_nets(w0, w1, truth):
    """Regression: the last layer orthogonal to part of the hidden range once made the hidden block of the
    layer-by-layer multipliers exactly singular (no certificate)."""
    net = Network.from_arrays([np.array(w0), np.array(w1)])
    upper = lipsdp.estimate(net, "sequential").upper
    assert truth <= upper <= lipsdp.estimate(net, "naive").upper * (1 + REL)


@pytest.mark.parametrize(
    "sizes,acts",
    [
        ([4, 9, 7, 3], "relu"),
        ([6, 12, 10, 8, 2], "relu"),
        ([5, 8, 8, 4], "leaky_relu:0.1"),
        ([3, 7, 6, 2], "tanh"),
        ([4, 6, 3, 9], "relu"),  # an output wider than the last hidden layer
        ([300, 40, 30, 5], "relu"),  # an input block of order >= 256: warm-started Lanczos
    ],
)
def test_the_ray_scale_is_the_best_on_a_grid(sizes, acts):
    """rho*(c T) along the ray of the layer-by-layer multipliers T: the scale `sequential` picks (the
    low-rank Woodbury form of `lmi.best_ray_scale`) is at least as good as the best of 400 scales in
    [1, 9] evaluated by the plain Schur recursion, and the bound is never looser than at c = 1."""
    from lipsdp.lmi import schur_rho, sequential_multipliers
    from lipsdp.reduced import along_ray

    net = he_network(sizes, sum(sizes), acts, bias_scale=0.2)
    t = sequential_multipliers(net)
    grid = [r for c in np.linspace(1.0, 9.0, 400) if (r := schur_rho(net, c * t)) is not None]
    best = schur_rho(net, along_ray(net, t))
    assert best <= min(grid) * (1 + 1e-4)
    assert best <= schur_rho(net, t) * (1 + 1e-9)
    assert lipsdp.estimate(net, "sequential").upper == pytest.approx(np.sqrt(best), rel=1e-6)


@pytest.mark.parametrize("rows, cols", [(7, 5), (5, 9), (1600, 1550)])  # both Gram sides; Lanczos at 1550
def test_layer_step_tau_is_the_best_on_a_grid(rows, cols):
    """A layer with pass-through neurons (slopes [1, 1] beside ReLUs): the tau `sequential_step` picks
    gives the next quadratic form X_(k+1)(tau) = 2 tau I - tau^2 D W (X + tau W' diag(2ab) W)^-1 W' D a
    smallest eigenvalue (of the formed matrix, LAPACK) at least that of scales around it."""
    import scipy.linalg as sla

    from lipsdp.lmi import sequential_step

    rng = np.random.default_rng(rows)
    a_mat = rng.standard_normal((cols, cols))
    x = a_mat @ a_mat.T / cols + 0.5 * np.eye(cols)
    w = rng.standard_normal((rows, cols)) / np.sqrt(cols)
    alpha = np.where(rng.random(rows) < 0.3, 1.0, 0.0)  # about 30% pass-through neurons
    beta = np.ones(rows)

    def lowest(tau: float) -> float:
        d, ab = alpha + beta, 2.0 * alpha * beta
        nxt = 2.0 * tau * np.eye(rows) - tau**2 * (d[:, None] * w) @ np.linalg.solve(
            x + tau * w.T @ (ab[:, None] * w), (d[:, None] * w).T)
        return float(sla.eigvalsh(0.5 * (nxt + nxt.T))[0])

    tau, x_next = sequential_step(x, w, alpha, beta)
    assert float(sla.eigvalsh(x_next)[0]) == pytest.approx(lowest(tau), rel=1e-9, abs=1e-12)
    best = lowest(tau)
    scales = np.geomspace(0.2, 5.0, 60 if rows < 100 else 9)
    assert all(best >= lowest(c * tau) - 1e-9 * abs(best) for c in scales)


@pytest.mark.parametrize("method", METHODS)
def test_sigmoid_slope_quarter(method):
    """f(x) = diag(3, 1) sigmoid(2 x): J = diag(6 s'(2x1), 2 s'(2x2)), max at 0 with s'(0) = 1/4: L = 1.5."""
    net = Network.from_arrays([2.0 * np.eye(2), np.diag([3.0, 1.0])], "sigmoid")
    upper = lipsdp.estimate(net, method).upper
    assert 1.5 <= upper <= 1.5 * (1 + REL)
    assert jacobian_norms(net, np.zeros((1, 2)))[0] == pytest.approx(1.5, rel=1e-12)


def test_tanh_diagonal_neuron_is_exact():
    """f(x) = D2 tanh(D1 x) with diagonal D1, D2: L = max_i |D2_i D1_i| = 3 (attained at x = 0).
    Per-neuron multipliers decouple the neurons, so Neuron is exact; one multiplier per layer (Layer)
    and the product of norms (||D1|| ||D2|| = 8) are not."""
    d1, d2 = np.array([0.5, -2.0, 1.0]), np.array([4.0, 1.5, -0.5])
    net = Network.from_arrays([np.diag(d1), np.diag(d2)], "tanh")
    truth = np.max(np.abs(d1 * d2))
    b = bounds(net)
    assert truth <= b["neuron"] <= truth * (1 + REL)
    assert b["naive"] == pytest.approx(8.0, rel=REL)
    assert b["layer"] > truth * 1.1 and b["sequential"] > truth * 1.1


def test_hat_function_bound_holds_for_every_bias():
    """LipSDP ignores biases, so its bound must cover the worst bias. With weights (1,1,1) -> (1,-2,1):
    biases (0,-1,-2) give the hat function (max |slope| 1), biases (0,-2,-1) give slope 2 on (1, 2)."""
    w0, w1 = np.ones((3, 1)), np.array([[1.0, -2.0, 1.0]])
    hat = Network.from_arrays([w0, w1], "relu", [np.array([0.0, -1.0, -2.0]), None])
    ramp = Network.from_arrays([w0, w1], "relu", [np.array([0.0, -2.0, -1.0]), None])
    assert exact_lipschitz_1d(hat) == pytest.approx(1.0, rel=1e-12)
    assert exact_lipschitz_1d(ramp) == pytest.approx(2.0, rel=1e-12)
    xs = np.array([[0.5], [1.5], [2.5]])
    np.testing.assert_allclose(hat.forward(xs).ravel(), [0.5, 0.5, 0.0])
    for method in ("naive", "sequential", "layer", "neuron"):
        assert lipsdp.estimate(hat, method).upper >= 2.0


# -- exact constants of tiny nets by region enumeration ---------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sizes", [[1, 8, 8, 1], [1, 6, 5, 3]])
def test_exact_constant_1d_between_bounds(sizes, seed):
    net = he_network(sizes, seed, bias_scale=1.0)
    exact = exact_lipschitz_1d(net)
    grid = jacobian_norms(net, np.linspace(-30.0, 30.0, 20001)[:, None]).max()
    assert grid <= exact * (1 + 1e-12)
    lower = lower_bound(net, seed=seed).value
    assert lower <= exact * (1 + 1e-12)
    for method, upper in bounds(net).items():
        assert upper >= exact, method


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("act", ["relu", "leaky_relu:0.2"])
def test_exact_constant_2d_between_bounds(act, seed):
    net = he_network([2, 8, 8, 1], seed, act, bias_scale=1.0)
    exact = exact_lipschitz_2d(net)
    g = np.linspace(-8.0, 8.0, 201)
    grid = jacobian_norms(net, np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)).max()
    assert grid <= exact * (1 + 1e-12)
    lower = lower_bound(net, seed=seed).value
    assert lower <= exact * (1 + 1e-12)
    for method, upper in bounds(net).items():
        assert upper >= exact, method


def test_exact_constant_2d_multi_output():
    net = he_network([2, 6, 6, 3], 7, bias_scale=0.5)
    exact = exact_lipschitz_2d(net)
    res = lipsdp.estimate(net, "neuron", lower=True)
    assert res.lower <= exact * (1 + 1e-12) <= res.upper


# -- orderings on seeded random nets --------------------------------------------------------------


NETS = [
    ([3, 8, 8, 2], "relu"),
    ([4, 10, 6, 3], "relu"),
    ([2, 12, 12, 12, 1], "relu"),
    ([3, 8, 8, 2], "tanh"),
    ([4, 6, 6, 6, 2], ["relu", "tanh", "leaky_relu:0.1"]),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sizes,act", NETS)
def test_method_ordering(sizes, act, seed):
    net = he_network(sizes, seed, act)
    b = bounds(net)
    lower = lower_bound(net, seed=seed, samples=256, steps=50).value
    slack = 1 + REL
    assert lower <= b["neuron"] * slack
    assert b["neuron"] <= b["layer"] * slack
    assert b["layer"] <= b["naive"] * slack
    assert b["sequential"] <= b["naive"] * slack
    assert b["neuron"] <= b["sequential"] * slack


@pytest.mark.parametrize("split", [1, 2])
def test_split_is_never_tighter(split):
    net = he_network([3, 8, 8, 8, 2], 5)
    whole = lipsdp.estimate(net, "neuron")
    pieces = lipsdp.estimate(net, "neuron", split=split)
    assert pieces.pieces == -(-len(net.weights) // split)
    assert pieces.upper >= whole.upper * (1 - REL)
    if split == 1:  # pieces of one matrix each: exactly the naive product of spectral norms
        assert pieces.upper == pytest.approx(lipsdp.estimate(net, "naive").upper, rel=REL)


# -- the published numbers of the original LipSDP code -------------------------------------------------


def test_original_neuron(original_neuron):
    assert round(original_neuron.upper, 3) == ORIGINAL_NEURON
    assert original_neuron.upper >= original_neuron.raw * (1 - 1e-9)


def test_original_layer(original_net):
    assert round(lipsdp.estimate(original_net, "layer").upper, 3) == ORIGINAL_LAYER


def test_original_split2(original_net, original_neuron):
    res = lipsdp.estimate(original_net, "neuron", split=2)
    assert round(res.upper, 3) == ORIGINAL_NEURON_SPLIT2
    assert res.upper >= original_neuron.upper


@pytest.mark.parametrize("method,published", [("layer", ORIGINAL_LAYER), ("neuron", ORIGINAL_NEURON)])
def test_original_with_clarabel(original_net, method, published):
    """The CVXPY + Clarabel path (a different solver and formulation) reproduces the same numbers."""
    res = lipsdp.estimate(original_net, method, solver="clarabel")
    assert res.solver == "clarabel"
    assert round(res.upper, 3) == published


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sizes,act", NETS[:2] + NETS[3:])
def test_default_solver_agrees_with_clarabel(sizes, act, seed):
    net = he_network(sizes, seed, act)
    default, clarabel = bounds(net, SDP), bounds(net, SDP, solver="clarabel")
    for m in SDP:
        assert default[m] == pytest.approx(clarabel[m], rel=1e-5), m


def test_original_cheap_methods(original_net, original_neuron):
    naive = lipsdp.estimate(original_net, "naive").upper
    seq = lipsdp.estimate(original_net, "sequential").upper
    prod = np.prod([np.linalg.norm(w, 2) for w in original_net.weights])
    assert naive == pytest.approx(prod, rel=REL) and naive >= prod
    assert original_neuron.upper <= seq <= naive


# -- names ------------------------------------------------------------------------------------------


def test_network_method_is_refused():
    net = he_network([2, 3, 1], 0)
    with pytest.raises(UnknownMethodError, match="unsound"):
        lipsdp.estimate(net, "network")


def test_unknown_method_lists_valid_names():
    net = he_network([2, 3, 1], 0)
    with pytest.raises(UnknownMethodError) as info:
        lipsdp.estimate(net, "nueron")
    for name in METHODS:
        assert name in str(info.value)
    assert set(METHODS) <= set(lipsdp.available_methods())


@pytest.mark.parametrize("solver,says", [("gurobi", "clarabel"), ("  ", "clarabel"), ("mosek", "mosek")])
def test_unusable_solver_is_a_solver_error(solver, says):
    net = he_network([2, 3, 1], 0)
    try:
        import mosek  # noqa: F401

        if solver == "mosek":
            pytest.skip("mosek is installed here; this test covers its absence")
    except ImportError:
        pass
    with pytest.raises(SolverError, match=says):
        lipsdp.estimate(net, "neuron", solver=solver)


def test_mosek_matches_clarabel():
    """Needs a licensed MOSEK; skips cleanly without one."""
    from lipsdp.solvers import cvxpy_solver

    try:
        cvxpy_solver("mosek")
    except SolverError as exc:
        pytest.skip(f"MOSEK unavailable: {exc}")
    net = he_network([3, 8, 8, 2], 0)
    a = lipsdp.estimate(net, "neuron", solver="mosek").upper
    b = lipsdp.estimate(net, "neuron", solver="clarabel").upper
    assert a == pytest.approx(b, rel=1e-4)
