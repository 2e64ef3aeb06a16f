"""The anytime tier (first-order LipSDP-Neuron): sound at every stopping point, tight with enough steps.

Truths used, none computed by the anytime code: the dense CVXPY formulation solved by Clarabel (its own
optimal value `raw` and its verified bound), exact constants of nonnegative ReLU nets (L = ||W_l ... W_0||:
every neuron is active for x >= 0 and the spectral norm is monotone on nonnegative matrices) and of
decoupled scalar chains (diagonal weights: L = max_i |prod_k w_k,i|, attained at x = 0 for tanh), and
Jacobian norms at x = 0 as lower bounds. Every run is step-limited (`budget=None`), so nothing depends
on the machine's speed.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import he_network

import lipsdp
from lipsdp import Network
from lipsdp.lmi import Balancing, sequential_multipliers
from lipsdp.methods import get_method
from lipsdp.methods.anytime import _line_search, _Objective

REALNETS = Path(__file__).resolve().parents[2] / "shared" / "realnets" / "fc"


def _anytime(net, steps: int, **options) -> lipsdp.Result:
    return lipsdp.estimate(net, "anytime", budget=None, steps=steps, **options)


def _mixed_net(seed: int) -> Network:
    rng = np.random.default_rng(seed)
    sizes = [3, 6, 5, 4, 2]
    weights = [rng.normal(0, 1.0, size=(b, a)) for a, b in pairwise(sizes)]
    return Network.from_arrays(weights, ["tanh", "leaky_relu:0.2", "sigmoid"])


def _local_slopes_net() -> Network:
    net = he_network([3, 6, 6, 2], seed=7)
    rng = np.random.default_rng(0)
    alphas = [rng.uniform(0, 0.5, n) for n in net.hidden_sizes]
    betas = [a + rng.uniform(0, 1, a.size) for a in alphas]
    return net.with_slopes(alphas, betas)


NETS = {
    "relu-deep": lambda: he_network([4, 8, 8, 8, 8, 3], seed=1),
    "relu-wide-input": lambda: he_network([30, 6, 6, 2], seed=2),  # eigenproblem reduced to the hidden width
    "mixed": lambda: _mixed_net(3),
    "per-neuron-slopes": _local_slopes_net,
}


@pytest.mark.parametrize("name", NETS)
def test_reaches_the_dense_optimum_from_above(name):
    """Verified anytime bound >= the SDP optimum and within 1e-4 of it. The optimum: Clarabel's own value
    (accurate to its tolerance, ~1e-7 relative) and, where the interior point reports one, its proven
    lower bound from a dual point."""
    net = NETS[name]()
    dense = lipsdp.estimate(net, "neuron-dense", solver="clarabel")
    res = _anytime(net, steps=3000)
    assert res.verified
    assert res.upper >= dense.raw * (1 - 1e-6)
    proven_lower = getattr(lipsdp.estimate(net, "neuron"), "sdp_lower", None)
    if proven_lower is not None:
        assert res.upper >= proven_lower
    assert res.upper <= dense.upper * (1 + 1e-4)


def test_limited_memory_path(monkeypatch):
    """Above FULL_BFGS_MAX multipliers the quasi-Newton model is limited-memory (no dense Hessian): forced
    here on a small net, it still reaches the optimum."""
    import lipsdp.methods.anytime as anytime_module

    net = NETS["relu-deep"]()
    optimum = lipsdp.estimate(net, "neuron-dense", solver="clarabel")
    monkeypatch.setattr(anytime_module, "FULL_BFGS_MAX", 0)
    res = _anytime(net, steps=3000)
    assert optimum.raw * (1 - 1e-6) <= res.upper <= optimum.upper * (1 + 1e-4)


@pytest.mark.parametrize("name", NETS)
def test_never_looser_than_sequential(name):
    net = NETS[name]()
    sequential = lipsdp.estimate(net, "sequential").upper
    previous = np.inf
    for steps in (0, 1, 10, 100):
        upper = _anytime(net, steps=steps).upper
        assert upper <= sequential * (1 + 1e-9)
        assert upper <= previous * (1 + 1e-9)  # more steps never hurt: the best iterate is kept
        previous = upper


@pytest.mark.parametrize("seed", [0, 1])
def test_nonnegative_relu_net_exact(seed):
    rng = np.random.default_rng(seed)
    sizes = [4, 7, 6, 5, 3]
    weights = [rng.random((b, a)) for a, b in pairwise(sizes)]
    exact = float(np.linalg.norm(weights[3] @ weights[2] @ weights[1] @ weights[0], 2))
    res = _anytime(Network.from_arrays(weights, "relu"), steps=2000)
    assert exact * (1 - 1e-12) <= res.upper <= exact * (1 + 1e-4)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_decoupled_scalar_chains_exact(act):
    """Diagonal weights decouple the net into scalar chains; with hidden weights positive (so relu chains
    stay active) L = max_i |w_0,i w_1,i w_2,i|; the top eigenvalue is multiple at the optimum."""
    rng = np.random.default_rng(4)
    n = 5
    diags = [rng.uniform(0.5, 2.0, n), rng.uniform(0.5, 2.0, n), rng.uniform(-2.0, 2.0, n)]
    exact = float(np.max(np.abs(diags[0] * diags[1] * diags[2])))
    res = _anytime(Network.from_arrays([np.diag(d) for d in diags], act), steps=2000)
    assert exact * (1 - 1e-12) <= res.upper <= exact * (1 + 1e-4)


@pytest.mark.parametrize("scale", [1e100, 1e-100])
def test_extreme_scales_give_verified_finite_bounds(scale):
    """A 3-layer tanh net with every weight times 1e100 or 1e-100 (constant near 1e300 / 1e-300): a finite
    verified bound, above the Jacobian norm at 0 and equal to scale^3 times the unscaled bound."""
    rng = np.random.default_rng(5)
    ws = [rng.standard_normal((6, 3)) / 3, rng.standard_normal((5, 6)) / 3, rng.standard_normal((2, 5)) / 3]
    base = _anytime(Network.from_arrays(ws, "tanh"), steps=300).upper
    res = _anytime(Network.from_arrays([w * scale for w in ws], "tanh"), steps=300)
    jacobian_at_zero = np.linalg.norm((ws[2] * scale) @ (ws[1] * scale) @ (ws[0] * scale), 2)
    assert res.verified and np.isfinite(res.upper) and res.upper > 0
    assert jacobian_at_zero <= res.upper
    assert res.upper == pytest.approx(base * scale**3, rel=1e-6)


def test_relu_constant_near_1e_minus_300():
    rng = np.random.default_rng(6)
    weights = [rng.random((5, 3)) * 1e-100, rng.random((4, 5)) * 1e-100, rng.random((2, 4)) * 1e-100]
    scaled = [w * 1e100 for w in weights]
    exact = float(np.linalg.norm(scaled[2] @ scaled[1] @ scaled[0], 2)) * 1e-300
    res = _anytime(Network.from_arrays(weights, "relu"), steps=1000)
    assert np.isfinite(res.upper) and exact * (1 - 1e-9) <= res.upper <= exact * (1 + 1e-4)


def test_reproducible_with_a_seed():
    net = he_network([5, 10, 10, 10, 3], seed=8)
    first = _anytime(net, steps=150, seed=3)
    second = _anytime(net, steps=150, seed=3)
    assert first.upper == second.upper
    np.testing.assert_array_equal(first.multipliers, second.multipliers)


def test_notes_record_steps_and_the_reason_to_stop():
    net = he_network([4, 8, 8, 2], seed=9)
    limited = _anytime(net, steps=7)
    assert any("7 quasi-Newton steps" in n and "stopped: step limit (7)" in n for n in limited.notes)
    converged = _anytime(net, steps=100_000)
    note = next(n for n in converged.notes if "quasi-Newton steps" in n)
    assert "stopped: converged" in note
    assert int(note.split()[0]) < 100_000


def _objective_near_sequential(net):
    """The anytime objective of the balanced net, at a point near the layer-by-layer multipliers."""
    bal = Balancing.of(net)
    obj = _Objective(bal.network(net), "cpu")
    s = torch.as_tensor(np.log(bal.multipliers(net, sequential_multipliers(net)))) + 0.05
    return obj, s, obj.point(s)


def test_analytic_gradient_matches_finite_differences():
    """d rho*/d t_i = -2 (x_i - a y_i)(x_i - b y_i) on the null vector of F, chained to log t and the
    soft-max smoothing, plus the barrier's t_i tr(R^-1 dR/dt_i); against central differences of the value."""
    for net in (_mixed_net(1), he_network([12, 5, 5, 2], seed=3)):
        obj, s, point = _objective_near_sequential(net)
        assert point is not None
        rng = np.random.default_rng(0)
        for mu, barrier in ((0.0, 0.0), (1e-2 * point.rho, 0.0), (1e-2 * point.rho, 0.1)):
            grad = obj.gradient(point, mu, barrier)
            for _ in range(3):
                d = torch.as_tensor(rng.standard_normal(s.numel()))
                h = 1e-6
                up = obj.smoothed(obj.point(s + h * d), mu, barrier)
                down = obj.smoothed(obj.point(s - h * d), mu, barrier)
                assert float(grad @ d) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_exact_hessian_matches_finite_differences():
    """The Hessian of log f_mu - eps log det R (spectral-function and Schur-complement terms, the barrier's
    trace formula) against central differences of the analytic gradient."""
    for net in (_mixed_net(1), he_network([12, 5, 5, 2], seed=3)):
        obj, s, point = _objective_near_sequential(net)
        for mu, eps in ((1e-2 * point.rho, 0.0), (1e-3 * point.rho, 1e-3)):
            hess, grad = obj.hessian(point, mu, eps)
            torch.testing.assert_close(grad, obj.gradient(point, mu, eps), rtol=1e-12, atol=1e-14)
            numeric = torch.zeros_like(hess)
            for i in range(s.numel()):
                e = torch.zeros_like(s)
                e[i] = 1e-6
                up, down = obj.gradient(obj.point(s + e), mu, eps), obj.gradient(obj.point(s - e), mu, eps)
                numeric[:, i] = (up - down) / 2e-6
            torch.testing.assert_close(hess, numeric, rtol=1e-5, atol=1e-6 * float(hess.abs().max()))


def test_schur_curvature_in_eigenvector_batches_is_the_same_sum(monkeypatch):
    """The Schur-complement curvature summed over batches of eigenvectors (memory bounded by
    CURVATURE_BYTES) equals the one-batch sum; the batch here holds a single eigenvector."""
    import lipsdp.methods.anytime as anytime_module

    obj, _, point = _objective_near_sequential(he_network([12, 5, 5, 2], seed=3))
    mu = 1e-1 * point.rho  # a warm level: many eigenvectors carry weight
    whole, _ = obj.hessian(point, mu, 1e-3)
    monkeypatch.setattr(anytime_module, "CURVATURE_BYTES", 1)
    batched, _ = obj.hessian(point, mu, 1e-3)
    torch.testing.assert_close(batched, whole, rtol=1e-12, atol=1e-12 * float(whole.abs().max()))


def test_margin_network_is_an_exact_reparametrisation():
    """F(rho, t'; a', b') of the margin network equals F(rho, t; a, b) - 2 d diag(0, t) with t = t'/(1 - d)."""
    from lipsdp.lmi import negated_lmi
    from lipsdp.methods.anytime import MARGIN, _with_margin

    net = _local_slopes_net()
    margin = _with_margin(net)
    t = np.random.default_rng(1).uniform(0.5, 2.0, net.n_neurons)
    f_margin = negated_lmi(margin, 3.0, t * (1 - MARGIN)).dense()
    f = negated_lmi(net, 3.0, t).dense()
    shift = np.diag(np.concatenate([np.zeros(net.sizes[0]), 2 * MARGIN * t]))
    np.testing.assert_allclose(f_margin, f - shift, rtol=1e-12, atol=1e-12)


def test_a_step_leaving_the_domain_is_only_shortened():
    """A huge step far outside the domain (R(T) not positive definite) is cut back to a feasible point with
    sufficient decrease, not rejected."""
    net = he_network([4, 8, 8, 2], seed=10)
    bal = Balancing.of(net)
    net_b = bal.network(net)
    obj = _Objective(net_b, "cpu")
    s = torch.as_tensor(np.log(bal.multipliers(net, sequential_multipliers(net))))
    point = obj.point(s)
    mu = 1e-2 * point.rho
    phi, grad = obj.smoothed(point, mu), obj.gradient(point, mu)
    direction = -1e4 * grad / torch.max(torch.abs(grad))
    assert obj.point(s + direction) is None
    found = _line_search(obj, s, phi, grad, direction, mu, 0.0, deadline=np.inf)
    assert found is not None
    new_point, new_phi = found[0], found[1]
    assert new_point is not None and new_phi < phi


def test_direct_call_on_a_depth_zero_net_is_the_norm():
    w = np.array([[3.0, 0.0], [0.0, 1.0]])
    assert get_method("anytime")(Network.from_arrays([w]), steps=5, budget=None).upper == pytest.approx(3.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    net = he_network([6, 12, 12, 3], seed=11)
    cpu = _anytime(net, steps=200, device="cpu").upper
    cuda = _anytime(net, steps=200, device="cuda").upper
    assert cuda == pytest.approx(cpu, rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not (REALNETS / "eclipse_gl_mnist_jr_elu.npz").exists(), reason="realnets not present")
def test_elu_mnist_net_leaves_its_warm_start():
    """784-128x3-10 ELU net: the former Adam tier ended at its layer-by-layer start (86.85); the exact
    LipSDP-Neuron optimum is 30.3749 (structured interior point, verified)."""
    res = _anytime(str(REALNETS / "eclipse_gl_mnist_jr_elu.npz"), steps=600)
    assert 30.3748 <= res.upper <= 30.3749 * 1.01


def _small_cnn() -> Network:
    """8x8 image -> conv 1->4 3x3 -> relu -> conv 4->8 3x3 stride 2 -> relu -> linear 128->10 (seeded)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)).double()
    return lipsdp.load_network(model, input_shape=(1, 8, 8))


def test_channel_groups_follow_the_recorded_convolutions():
    from lipsdp.methods.anytime import _channel_groups

    groups, n_groups = _channel_groups(_small_cnn())
    assert n_groups == 4 + 8  # one per output channel of each convolution (no hidden dense layer)
    np.testing.assert_array_equal(groups[:256], np.repeat(np.arange(4), 64))  # C-order (C, H, W): 8x8 per channel
    np.testing.assert_array_equal(groups[256:], 4 + np.repeat(np.arange(8), 16))
    assert _channel_groups(he_network([4, 8, 8, 2], seed=1)) is None  # no convolution: nothing to tie


def test_tied_objective_is_the_full_one_on_the_channel_subspace():
    """The per-channel objective at x is the full objective at s0 + P x; its gradient P'g and Hessian P'HP
    match central differences of its own value and gradient."""
    from lipsdp.methods.anytime import _channel_groups, _Tied

    net = _small_cnn()
    bal = Balancing.of(net)
    obj = _Objective(bal.network(net), "cpu")
    s0 = torch.as_tensor(np.log(bal.multipliers(net, sequential_multipliers(net)))) + 0.05
    groups, n_groups = _channel_groups(net)
    tied = _Tied(obj, s0, torch.as_tensor(groups), n_groups)
    x = torch.as_tensor(np.random.default_rng(2).normal(0.0, 0.02, n_groups))
    point = tied.point(x)
    full = obj.point(s0 + x[torch.as_tensor(groups)])
    mu, eps = 1e-2 * point.rho, 1e-3
    assert tied.smoothed(point, mu, eps) == obj.smoothed(full, mu, eps)
    hess, grad = tied.hessian(point, mu, eps)
    torch.testing.assert_close(grad, tied.gradient(point, mu, eps), rtol=1e-12, atol=1e-14)
    for i in range(n_groups):
        e = torch.zeros(n_groups, dtype=torch.float64)
        e[i] = 1e-6
        up, down = tied.point(x + e), tied.point(x - e)
        numeric = (tied.smoothed(up, mu, eps) - tied.smoothed(down, mu, eps)) / 2e-6
        assert float(grad[i]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)
        column = (tied.gradient(up, mu, eps) - tied.gradient(down, mu, eps)) / 2e-6
        torch.testing.assert_close(hess[:, i], column, rtol=1e-5, atol=1e-6 * float(hess.abs().max()))


def test_cnn_reaches_the_optimum_through_the_channel_phase():
    """On a small CNN the per-channel phase runs first; the result is verified, above the proven lower bound on
    the LipSDP-Neuron optimum (structured interior point) and within 1e-4 of the optimum."""
    net = _small_cnn()
    exact = lipsdp.estimate(net, "neuron")
    res = _anytime(net, steps=400)
    assert any("one multiplier per channel" in n for n in res.notes)
    assert exact.sdp_lower <= res.upper <= exact.upper * (1 + 1e-4)
    assert res.upper <= lipsdp.estimate(net, "sequential").upper


def test_no_step_certifies_the_start_once(monkeypatch):
    """With no step taken the best point is the start: one certificate (a minute on a CNN layer of 4096)."""
    import lipsdp.methods.anytime as anytime_module

    calls = []
    real = anytime_module.verified_output

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(anytime_module, "verified_output", counted)
    net = he_network([4, 8, 8, 2], seed=5)
    res = get_method("anytime")(net, steps=0, budget=None)
    assert len(calls) == 1
    # the start is the better of two layer-by-layer multiplier vectors (of the net and of the balanced net)
    assert lipsdp.estimate(net, "neuron").upper <= res.upper <= lipsdp.estimate(net, "sequential").upper


def test_one_affine_map_gets_the_sequential_bound():
    """No hidden layer (e.g. the convolution before a max pool): the bound is the proved norm, as tight as
    `sequential` (the product-of-norms path could be a hair looser), and above the exact norm."""
    w = np.random.default_rng(4).standard_normal((60, 9))
    net = lipsdp.Network.from_arrays([w])
    exact = np.linalg.norm(w, 2)
    any_upper = lipsdp.estimate(net, method="anytime").upper
    assert exact <= any_upper <= lipsdp.estimate(net, method="sequential").upper


# Widths for which min_width=1 eliminates layers 1 and 4 from the LMI (each as wide as both neighbours).
ELIMINABLE = [5, 12, 4, 6, 14, 3, 2]


@pytest.fixture
def eliminating(monkeypatch):
    """Every hidden layer at least as wide as both neighbours is eliminated (`lipsdp.reduced`), as the
    4096-neuron layers of a CIFAR-10 CNN are: anytime then descends on the reduced LMI."""
    from lipsdp import reduced

    monkeypatch.setattr(reduced, "MIN_WIDTH", 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reduced_lmi_descent_lies_between_the_optimum_and_sequential(seed, eliminating):
    """With wide layers eliminated the descent runs on the reduced LMI (rho* and its gradient from
    `Reduction.rho_gradient`); its verified bound is above the proven lower bound on the LipSDP-Neuron optimum
    (the structured interior point on the full LMI) and closes at least half the gap from sequential to it."""
    net = he_network(ELIMINABLE, seed)
    res = _anytime(net, steps=200)
    assert res.verified and any("on the reduced LMI" in n for n in res.notes)
    assert any("eliminated from the LMI" in n for n in res.notes)
    optimum = lipsdp.estimate(net, "neuron")
    sequential = lipsdp.estimate(net, "sequential").upper
    assert optimum.sdp_lower <= res.upper <= optimum.upper + 0.5 * (sequential - optimum.upper)


def test_reduced_lmi_descent_is_never_looser_than_sequential(eliminating):
    net = he_network(ELIMINABLE, 3)
    sequential = lipsdp.estimate(net, "sequential").upper
    previous = np.inf
    for steps in (0, 1, 10, 100):
        upper = _anytime(net, steps=steps).upper
        assert upper <= sequential * (1 + 1e-9)
        assert upper <= previous * (1 + 1e-9)
        previous = upper


@pytest.mark.parametrize("seed", [0, 1])
def test_reduced_lmi_descent_on_a_nonnegative_net_is_above_its_exact_constant(seed, eliminating):
    """L = ||W_3 W_2 W_1 W_0|| exactly for nonnegative ReLU weights (every neuron active for x >= 0); the
    verified bound is above it and within 1e-6 of it."""
    rng = np.random.default_rng(seed)
    weights = [rng.random((b, a)) for a, b in pairwise([4, 9, 3, 8, 2])]
    net = Network.from_arrays(weights, "relu")
    exact = float(np.linalg.norm(weights[3] @ weights[2] @ weights[1] @ weights[0], 2))
    res = _anytime(net, steps=400)
    assert any("on the reduced LMI" in n for n in res.notes)
    assert exact * (1 - 1e-12) <= res.upper <= exact * (1 + 1e-6)


def test_reduced_lmi_descent_ties_channels_first_on_a_cnn(eliminating):
    """On a CNN whose first convolution is eliminated, the descent first moves one multiplier per channel."""
    from lipsdp import reduced

    net = _small_cnn()
    assert reduced.plan(net) == (1,)
    res = _anytime(net, steps=200)
    assert any("one multiplier per channel (12 variables)" in n for n in res.notes)
    optimum = lipsdp.estimate(net, "neuron")
    assert optimum.sdp_lower <= res.upper <= lipsdp.estimate(net, "sequential").upper
