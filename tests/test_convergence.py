"""The exact tier on trained and ill-conditioned networks: `neuron` converges, proves how close it is to
the LipSDP optimum, and is never looser than the cheaper tiers.

Independent truths: closed-form constants of nets where LipSDP-Neuron is exact (decoupled scalar chains;
nonnegative weights with ReLU / tanh / leaky ReLU / sigmoid, where L = ||W_l ... W_0|| times the slopes
because the all-active region is reachable), Clarabel's dense optimum, and the published-style real nets
of ../shared/realnets (skipped when absent).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import he_network
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipsdp
from lipsdp import Network
from lipsdp.dual import lower_bound_rho
from lipsdp.lmi import Balancing, negated_lmi, sequential_multipliers

REALNETS = Path(__file__).resolve().parents[2] / "shared" / "realnets" / "fc"
SLOPE = {"relu": 1.0, "tanh": 1.0, "leaky_relu:0.1": 1.0, "sigmoid": 0.25}


def scalar_chains(seed: int, width: int = 5, depth: int = 3) -> tuple[Network, float]:
    """Decoupled scalar ReLU chains with diagonal weights between 1e-8 and 1e8 (positive, so every chain
    can be active): LipSDP-Neuron is exact and L = the largest product of one chain's weights."""
    rng = np.random.default_rng(seed)
    weights = [np.diag(10.0 ** rng.uniform(-8, 8, width)) for _ in range(depth + 1)]
    return Network.from_arrays(weights, "relu"), float(np.max(np.prod([np.diag(w) for w in weights], axis=0)))


def nonnegative_net(activation: str, seed: int, depth: int = 3) -> tuple[Network, float]:
    """Nonnegative weights whose rows and columns are scaled by 1e-4..1e4 (layers of condition up to
    1e16). Zero biases: every pre-activation of a positive input is >= 0, where all slopes are beta, and
    the Jacobian there is beta^l W_l ... W_0 with nonnegative entries, whose norm is the constant."""
    rng = np.random.default_rng(seed)
    sizes = [4] + [6] * depth + [3]
    weights = [
        rng.uniform(0.1, 1.0, (b, a)) * 10.0 ** rng.uniform(-4, 4, (b, 1)) * 10.0 ** rng.uniform(-4, 4, (1, a))
        for a, b in itertools.pairwise(sizes)
    ]
    product = weights[0]
    for w in weights[1:]:
        product = SLOPE[activation] * (w @ product)
    return Network.from_arrays(weights, activation), float(np.linalg.norm(product, 2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neuron_is_exact_on_decoupled_scalar_chains(seed):
    net, exact = scalar_chains(seed)
    res = lipsdp.estimate(net, method="neuron")
    assert exact <= res.upper <= exact * (1 + 1e-6)
    assert res.status == "optimal" and res.gap is not None and res.gap <= 1e-4
    assert res.sdp_lower <= exact * (1 + 1e-12)


@pytest.mark.parametrize("activation", sorted(SLOPE))
@pytest.mark.parametrize("seed", [0, 1])
def test_neuron_is_exact_on_ill_conditioned_nonnegative_nets(activation, seed):
    net, exact = nonnegative_net(activation, seed)
    res = lipsdp.estimate(net, method="neuron")
    assert exact <= res.upper <= exact * (1 + 1e-6)
    assert res.gap is not None and res.gap <= 1e-4


def test_balancing_is_an_exact_congruence():
    """F^ = D F D 2^-2o, entry by entry and bit for bit, with per-neuron exponents and an output one."""
    rng = np.random.default_rng(3)
    net = Network.from_arrays(
        [rng.standard_normal((5, 4)) * 10.0 ** rng.uniform(-6, 6, (5, 1)), rng.standard_normal((3, 5)),
         rng.standard_normal((2, 3))],
        ["tanh", "leaky_relu:0.1"],
    )
    bal = Balancing.of(net).with_output_exp(-7)
    assert bal.is_exact(net) and not bal.is_identity()
    t, rho = rng.uniform(0.1, 2.0, net.n_neurons), 3.25
    f = negated_lmi(net, rho, t).dense()
    f_bal = negated_lmi(bal.network(net), bal.balanced_rho(rho), bal.multipliers(net, t)).dense()
    d = np.concatenate([np.full(4, 2.0**bal.input_exp)] + [2.0 ** e.astype(float) for e in bal.hidden_exps])
    np.testing.assert_array_equal(np.ldexp(d[:, None] * f * d[None, :], -2 * bal.output_exp), f_bal)
    np.testing.assert_array_equal(bal.original_multipliers(net, bal.multipliers(net, t)), t)


def _dense_optimum(net: Network) -> float:
    res = lipsdp.estimate(net, method="neuron-dense", solver="clarabel")
    return res.raw


@pytest.mark.parametrize(
    "sizes, activations",
    [([3, 6, 5, 2], "relu"), ([4, 5, 5, 3], ["tanh", "sigmoid"]), ([2, 7, 4, 3], ["elu", "leaky_relu:0.1"]),
     ([5, 4, 4, 4, 2], "softplus")],
)
def test_proven_lower_bound_brackets_the_dense_optimum(sizes, activations):
    net = he_network(sizes, seed=len(sizes), activation=activations if isinstance(activations, str) else "relu")
    if not isinstance(activations, str):
        net = Network.from_arrays(net.weights, activations)
    dense = _dense_optimum(net)
    res = lipsdp.estimate(net, method="neuron")
    assert res.sdp_lower is not None
    assert res.sdp_lower <= dense * (1 + 1e-7)  # Clarabel solves to ~1e-8
    assert dense <= res.upper * (1 + 1e-7)
    assert res.gap <= 1e-4 and res.status == "optimal"


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), rank=st.integers(1, 12), tied=st.booleans())
def test_any_dual_point_gives_a_bound_below_the_optimum(seed, rank, tied):
    """Weak duality holds for every V, not only for the solver's: the bound never exceeds the verified
    upper bound squared (a true upper bound on the optimum)."""
    rng = np.random.default_rng(seed)
    net = he_network([3, 5, 4, 2], seed=seed % 7, activation=["relu", "tanh", "leaky_relu:0.2"][seed % 3])
    v = rng.standard_normal((sum(net.sizes[:-1]), rank)) * 10.0 ** rng.uniform(-3, 3)
    lower = lower_bound_rho(net, v, tied=tied)
    upper = lipsdp.estimate(net, method="layer" if tied else "neuron").upper
    assert lower is None or 0 < lower <= upper**2


def _digits_net(activation: str, seed: int) -> Network:
    """A 64-24-24-10 classifier trained briefly (full-batch Adam) on scikit-learn's 8x8 digits."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    act = {"sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU}[activation]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 24), act(), torch.nn.Linear(24, 24), act(), torch.nn.Linear(24, 10)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return lipsdp.io.load_network(model)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "elu"])
def test_tiers_ordered_on_trained_nets(activation):
    net = _digits_net(activation, seed=0)
    bounds = {m: lipsdp.estimate(net, method=m).upper for m in ("neuron", "layer", "sequential")}
    assert bounds["neuron"] <= bounds["layer"] * (1 + 1e-9)
    assert bounds["layer"] <= bounds["sequential"] * (1 + 1e-9)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    acts=st.lists(st.sampled_from(["relu", "tanh", "sigmoid", "elu", "leaky_relu:0.1", "softplus"]), min_size=3,
                  max_size=3),
    log_scales=st.lists(st.floats(-6, 6), min_size=4, max_size=4),
)
def test_tiers_ordered_on_random_mixed_nets(seed, widths, acts, log_scales):
    rng = np.random.default_rng(seed)
    sizes = [3, *widths, 2]
    weights = [rng.standard_normal((b, a)) * 10.0 ** s for a, b, s in zip(sizes[:-1], sizes[1:], log_scales)]
    net = Network.from_arrays(weights, acts[: len(widths)])
    bounds = {m: lipsdp.estimate(net, method=m).upper for m in ("neuron", "layer", "sequential")}
    assert bounds["neuron"] <= bounds["layer"] * (1 + 1e-9)
    assert bounds["layer"] <= bounds["sequential"] * (1 + 1e-9)


@pytest.mark.skipif(not REALNETS.exists(), reason="../shared/realnets is not present")
def test_quadrotor_controller_reaches_its_optimum():
    """ARCH-COMP quadrotor controller (12-64x3-3, sigmoid): `neuron` used to stall at 67.6."""
    res = lipsdp.estimate(REALNETS / "arch_quad_sigmoid.npz", method="neuron")
    assert res.upper <= 26.8
    assert res.gap is not None and res.gap <= 1e-4 and res.status == "optimal"
    assert res.upper <= lipsdp.estimate(REALNETS / "arch_quad_sigmoid.npz", method="layer").upper


@pytest.mark.skipif(not REALNETS.exists(), reason="../shared/realnets is not present")
def test_published_glipsdp_value():
    """GLipSDP's published LipSDP-Neuron value for its digits fnn2 (output 8): 5.109715."""
    res = lipsdp.estimate(REALNETS / "glipsdp_digits_fnn2_seed0_out8.npz", method="neuron")
    assert res.sdp_lower <= 5.109715 * (1 + 2e-7) and res.upper == pytest.approx(5.109715, rel=1e-6)


def test_layer_by_layer_start_is_a_floor():
    """`neuron` returns the best candidate it certified; a time limit of zero leaves only the start."""
    net = he_network([4, 8, 8, 2], seed=5, activation="tanh")
    seq = lipsdp.estimate(net, method="sequential").upper
    res = lipsdp.estimate(net, method="neuron", time_limit=1e-9)
    assert res.upper <= seq * (1 + 1e-12)
    assert math.isfinite(res.upper)
    t = sequential_multipliers(net)
    assert np.all(t > 0)
