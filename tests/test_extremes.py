"""Numerical extremes: tiny and huge weights, zero, rank-deficient, duplicated and ill-conditioned layers.

Each case either gives a verified bound that covers the truth (closed form or exact scaling law) or a
clear LipSDPError: never a wrong number, never NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import exact_lipschitz_1d

import lipsdp
from lipsdp import LipSDPError, Network, VerificationError
from lipsdp.certificate import certify
from lipsdp.lower import lower_bound
from lipsdp.scaling import fold_linear_layers, layer_exponents, rescale

METHODS = ("naive", "sequential", "layer", "neuron")
REL = 1e-6


def orthogonal(n: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))[0]


# -- closed forms at extreme scales -------------------------------------------------------------------


@pytest.mark.parametrize(
    "c0,c1", [(1e-8, 1e-8), (1e8, 1e8), (1e-8, 1e8), (1e8, 1e-8), (1e-150, 1e-150), (1e150, 1e-20)]
)
@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_relu_net_at_extreme_scales(c0, c1, method):
    """f(x) = c1 W1 relu(c0 Q x), Q orthogonal: L = c0 c1 ||W1|| exactly (see test_methods)."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((2, 5))
    truth = c0 * c1 * np.linalg.norm(w1, 2)
    res = lipsdp.estimate(Network.from_arrays([c0 * orthogonal(5, 1), c1 * w1]), method)
    assert np.isfinite(res.upper)
    assert truth <= res.upper <= truth * (1 + REL)


@pytest.mark.parametrize("scales", [(1e-8, 1.0, 1e8), (1e8, 1e-8, 1.0), (1e-8, 1e-8, 1e-8), (1e8, 1e8, 1e8)])
def test_tanh_diagonal_chain_interior_scaling(scales):
    """f = D2 tanh(D1 tanh(D0 x)), diagonal: L = max_i |d0 d1 d2|_i (slopes 1 at 0). Scaling an interior
    tanh layer changes the function, but not the LMI beyond the exact congruence: Neuron stays exact."""
    d = [np.array([0.5, -2.0, 1.0]), np.array([3.0, 1.0, -0.5]), np.array([1.0, 2.0, 4.0])]
    net = Network.from_arrays([np.diag(v) * c for v, c in zip(d, scales)], "tanh")
    truth = float(np.max(np.abs(d[0] * d[1] * d[2]))) * math.prod(scales)
    assert lower_bound(net, samples=4, steps=0).value <= truth * (1 + 1e-12)
    for method in METHODS:
        upper = lipsdp.estimate(net, method).upper
        assert upper >= truth, method
    assert lipsdp.estimate(net, "neuron").upper <= truth * (1 + REL)


@pytest.mark.parametrize("c", [1e-8, 1e8])
@pytest.mark.parametrize("act", ["sigmoid", "softplus", "elu"])
def test_smooth_activations_scale_like_the_lmi(c, act):
    """For every slope-restricted activation, the LMI bound of (c W0, W1, W2) is c times that of (W0, W1, W2):
    scaling the first layer reparameterises the input (f(c x)), so the truth scales by c as well."""
    rng = np.random.default_rng(5)
    ws = [rng.standard_normal((6, 3)), rng.standard_normal((5, 6)), rng.standard_normal((2, 5))]
    base = Network.from_arrays(ws, act)
    scaled = Network.from_arrays([c * ws[0]] + ws[1:], act)
    for method in METHODS:
        a, b = lipsdp.estimate(base, method).upper, lipsdp.estimate(scaled, method).upper
        assert b == pytest.approx(c * a, rel=1e-4), method
        lower = lower_bound(scaled, samples=64, steps=10, seed=0).value
        assert lower <= b * (1 + 1e-9)


def test_underflowing_bound_is_rounded_up_not_to_zero():
    """L = 1e-300 * 1e-300 * sqrt(2) underflows float64; the verified bound must still be > 0."""
    net = Network.from_arrays([np.eye(2) * 1e-300, np.ones((1, 2)) * 1e-300])
    for method in METHODS:
        assert lipsdp.estimate(net, method).upper > 0.0


def test_overflowing_bound_is_a_clear_error():
    net = Network.from_arrays([np.eye(2) * 1e300, np.ones((1, 2)) * 1e300])
    for method in METHODS:
        with pytest.raises(VerificationError, match="float64 range"):
            lipsdp.estimate(net, method)


def test_extreme_single_layers_through_estimate():
    """One layer of magnitude 1e200 or 1e-160: the bound is the spectral norm, to 1e-6, and never NaN."""
    for c in (1e200, 1e-160):
        w = np.ones((2, 3)) * c
        for method in METHODS:
            upper = lipsdp.estimate(Network.from_arrays([w]), method).upper
            assert np.sqrt(6.0) * c <= upper <= np.sqrt(6.0) * c * (1 + REL)


# -- degenerate layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_zero_layer_gives_zero_or_tiny_bound(where, method):
    """A zero weight matrix anywhere makes f constant: L = 0; the bound must be finite and >= 0."""
    rng = np.random.default_rng(where)
    ws = [rng.standard_normal((4, 3)), rng.standard_normal((4, 4)), rng.standard_normal((2, 4))]
    ws[where] = np.zeros_like(ws[where])
    res = lipsdp.estimate(Network.from_arrays(ws, "relu"), method)
    assert np.isfinite(res.upper) and 0.0 <= res.upper <= 1e-100


@pytest.mark.parametrize("method", METHODS)
def test_rank_one_and_duplicated_neurons(method):
    """Duplicated neurons: relu(w x) twice with output weights (a, b) is (a + b) relu(w x): L = |a + b| ||w||
    for a 1-D chain. Rank-one layers give singular LMI blocks; the bound must still be >= the exact value."""
    w0 = np.array([[1.5], [1.5], [-0.7], [-0.7]])
    w1 = np.array([[2.0, 1.0, 0.5, 0.5]])
    net = Network.from_arrays([w0, w1], "relu")
    exact = exact_lipschitz_1d(net)
    assert exact == pytest.approx(4.5, rel=1e-12)
    assert lipsdp.estimate(net, method).upper >= exact
    u = np.random.default_rng(0).standard_normal((6, 1))
    rank1 = Network.from_arrays([u @ np.ones((1, 3)), np.ones((1, 6))], "relu")
    lower = lower_bound(rank1, samples=32, steps=10).value
    assert lipsdp.estimate(rank1, method).upper >= lower


@pytest.mark.parametrize("cond", [1e6, 1e12, 1e15])
@pytest.mark.parametrize("method", METHODS)
def test_ill_conditioned_layers(cond, method):
    """W0 = U diag(1, ..., 1/cond) V': the identity-first-layer closed form L = ||W1|| still holds when the
    second layer is ill-conditioned (relu(x) then W1: all activation patterns are realised)."""
    rng = np.random.default_rng(int(np.log10(cond)))
    u, v = orthogonal(4, 7), orthogonal(4, 8)
    w1 = u @ np.diag(np.geomspace(1.0, 1.0 / cond, 4)) @ v.T
    net = Network.from_arrays([np.eye(4), w1, rng.standard_normal((1, 4))], "relu")
    lower = lower_bound(net, samples=64, steps=20).value
    upper = lipsdp.estimate(net, method).upper
    assert np.isfinite(upper) and lower <= upper * (1 + 1e-9)


# -- the rescaling itself ----------------------------------------------------------------------------


def test_rescale_is_exact_and_reversible():
    rng = np.random.default_rng(0)
    net = Network.from_arrays([rng.standard_normal((3, 2)) * 1e-9, rng.standard_normal((2, 3)) * 3e7], "relu")
    r = rescale(net)
    for w, ws, e in zip(net.weights, r.network.weights, r.exponents):
        np.testing.assert_array_equal(np.ldexp(ws, -e), w)
        assert 0.5 <= np.max(np.abs(ws)) < 1.0
    assert r.exponents == tuple(layer_exponents(net))
    # For ReLU the scaled net is exactly 2^total times the original function (biases scaled along).
    x = rng.standard_normal((5, 2))
    np.testing.assert_allclose(r.network.forward(x), np.ldexp(net.forward(x), r.total), rtol=1e-12)


def test_rescaled_multipliers_certify_the_original():
    """The congruence: multipliers mapped back from the scaled net certify the original net directly."""
    rng = np.random.default_rng(1)
    net = Network.from_arrays(
        [
            rng.standard_normal((5, 3)) * 1e-3,
            rng.standard_normal((4, 5)) * 1e3,
            rng.standard_normal((2, 4)) * 10,
        ],
        "tanh",
    )
    res = lipsdp.estimate(net, "neuron")
    cert = certify(net, res.multipliers)
    assert cert is not None
    assert cert.upper == pytest.approx(res.upper, rel=1e-4)


def test_linear_layers_are_folded_exactly():
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((3, 2)), rng.standard_normal((4, 3)), rng.standard_normal((2, 4))]
    net = Network.from_arrays(ws, ["identity", "relu"])
    folded = fold_linear_layers(net)
    assert folded.depth == 1
    x = rng.standard_normal((7, 2))
    np.testing.assert_allclose(folded.forward(x), net.forward(x), rtol=1e-12, atol=1e-12)
    linear = Network.from_arrays(ws, "identity")
    truth = np.linalg.norm(ws[2] @ ws[1] @ ws[0], 2)
    for method in METHODS:
        assert truth <= lipsdp.estimate(linear, method).upper <= truth * (1 + REL)


def test_nan_and_inf_weights_are_refused():
    for bad in (np.nan, np.inf):
        w = np.ones((2, 2))
        w[0, 1] = bad
        with pytest.raises(LipSDPError, match="NaN or infinite"):
            lipsdp.estimate(Network.from_arrays([w, np.ones((1, 2))]), "naive")
