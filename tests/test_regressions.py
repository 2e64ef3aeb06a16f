"""Concrete networks on which the property suite (test_soundness.py) once failed, kept as explicit cases.

Each records the weights hypothesis printed, what went wrong, and checks the fixed behaviour against an
independent truth (exact 1-D constant, the product of the layer norms, or a sampled lower bound).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import exact_lipschitz_1d

import lipsdp
from lipsdp import Network
from lipsdp.lower import lower_bound

METHODS = ("naive", "sequential", "layer", "neuron")
REL = 1e-6


def all_bounds(net: Network) -> dict[str, float]:
    return {m: lipsdp.estimate(net, m).upper for m in METHODS}


def assert_ordered(b: dict[str, float]) -> None:
    s = 1 + REL
    assert b["neuron"] <= b["layer"] * s and b["layer"] <= b["naive"] * s
    assert b["sequential"] <= b["naive"] * s and b["neuron"] <= b["sequential"] * s


def test_scalar_identity_chain():
    """Found by test_bounds_above_lower_bound_and_ordered (derandomized default profile, first run).
    f(x) = w1 * w0 * x. LipSDP's optimum for identity neurons (alpha = beta) is reached only as T -> inf:
    layer/neuron stopped 5e-5 and sequential 2.5e-3 above the naive product (= the truth here).
    Fixed by folding alpha == beta layers into their neighbours (lipsdp.scaling.fold_linear_layers)."""
    net = Network.from_arrays(
        [np.array([[0.1257302210933933]]), np.array([[-0.1321048632913019]])], "identity"
    )
    truth = 0.1257302210933933 * 0.1321048632913019
    b = all_bounds(net)
    for m, upper in b.items():
        assert truth <= upper <= truth * (1 + REL), m
    assert_ordered(b)


@pytest.mark.parametrize(
    "weights,acts",
    [
        # HYPOTHESIS_PROFILE=long, test_bounds_above_lower_bound_and_ordered, seed=60 (structure 'sparse').
        ([[[-1.0512243535238837]], [[0.0]]], ["relu"]),
        # HYPOTHESIS_PROFILE=long, test_bounds_above_exact_constant_1d, seed=0 (structure 'sparse').
        ([[[0.1257302210933933]], [[0.6404226504432821]], [[-0.0]]], ["relu", "relu"]),
    ],
    ids=["zero-last-2layer", "zero-last-3layer"],
)
def test_zero_last_layer(weights, acts):
    """A zero layer makes f constant (L = 0). Before: naive 1e-106, layer/neuron 2e-5 (ordering broken),
    sequential a VerificationError. Now every method returns exactly 0 (dead-neuron pruning)."""
    net = Network.from_arrays([np.array(w) for w in weights], acts)
    assert exact_lipschitz_1d(net) == 0.0
    for m, upper in all_bounds(net).items():
        assert upper == 0.0, m


@pytest.mark.parametrize("method", METHODS)
def test_zero_row_and_column_neurons(method):
    """Dead neurons (zero input row: constant; zero output column: unused) made LMI blocks singular:
    sequential refused, layer/neuron were loose. f(x) = 2 relu(x) + relu(-x) + const has L = 2."""
    w0 = np.array([[1.0], [-1.0], [0.0], [3.0]])
    w1 = np.array([[2.0, 1.0, 5.0, 0.0]])
    net = Network.from_arrays([w0, w1], "relu", [np.array([0.0, 0.0, 0.7, 0.0]), None])
    assert exact_lipschitz_1d(net) == pytest.approx(2.0, rel=1e-12)
    upper = lipsdp.estimate(net, method).upper
    naive = np.sqrt(2.0) * np.sqrt(5.0)  # ||(1, -1)|| ||(2, 1)|| after pruning the dead neurons
    assert 2.0 <= upper <= naive * (1 + REL)
    if method == "neuron":  # per-neuron multipliers decouple the two ReLUs: exact
        assert upper <= 2.0 * (1 + REL)
    assert lower_bound(net, samples=16, steps=0).value <= upper


def test_scalar_sigmoid_chain_layer_not_above_naive():
    """HYPOTHESIS_PROFILE=long, test_bounds_above_lower_bound_and_ordered, seed=0, sizes [1, 1, 1, 1], sigmoid.
    A scalar chain: L <= |w0 w1 w2| / 16 and LipSDP's optimum equals that product. Through CVXPY + Clarabel
    the certified layer/neuron bounds stopped 1.7e-6 (relative) above the naive product, outside the 1e-6
    ordering tolerance: Clarabel's default accuracy, not a soundness issue (the bound is still verified).
    The default solver must meet the ordering; Clarabel is held to its own accuracy (1e-5)."""
    ws = [
        np.array([[0.1257302210933933]]),
        np.array([[-0.1321048632913019]]),
        np.array([[0.6404226504432821]]),
    ]
    net = Network.from_arrays(ws, "sigmoid")
    product = abs(0.1257302210933933 * 0.1321048632913019 * 0.6404226504432821) / 16
    b = all_bounds(net)
    for m, upper in b.items():
        assert upper >= product * (1 - 1e-12), m
    assert_ordered(b)
    for m in ("layer", "neuron"):
        assert product <= lipsdp.estimate(net, m, solver="clarabel").upper <= b["naive"] * (1 + 1e-5)
