"""The Network model: validation errors, evaluation, splitting, slope bounds."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import he_network

from lipsdp import InvalidNetworkError, LipSDPError, Network


def test_shapes_and_sizes():
    net = he_network([3, 5, 4, 2], 0)
    assert net.sizes == [3, 5, 4, 2]
    assert net.depth == 2 and net.hidden_sizes == [5, 4] and net.n_neurons == 9
    assert "[3, 5, 4, 2]" in net.describe()


def test_forward_matches_hand_computation():
    w0, w1 = np.array([[1.0, -2.0], [0.5, 1.0]]), np.array([[2.0, -1.0]])
    b0, b1 = np.array([0.1, -3.0]), np.array([0.5])
    net = Network.from_arrays([w0, w1], "relu", [b0, b1])
    x = np.array([1.0, 2.0])  # W0 x + b0 = (-2.9, -1.0) -> relu 0 -> output b1
    assert net.forward(x)[0] == pytest.approx(0.5)
    x = np.array([3.0, 1.0])  # (1.1, -0.5) -> (1.1, 0) -> 2.2 + 0.5
    assert net.forward(x)[0] == pytest.approx(2.7)
    assert net.forward(np.stack([x, x])).shape == (2, 1)


@pytest.mark.parametrize(
    "name,x,y",
    [
        ("tanh", 0.7, np.tanh(0.7)),
        ("sigmoid", -1.3, 1.0 / (1.0 + np.exp(1.3))),
        ("softplus", 0.4, np.log1p(np.exp(0.4))),
        ("leaky_relu:0.1", -2.0, -0.2),
        ("elu:2.0", -1.0, 2.0 * (np.exp(-1.0) - 1.0)),
        ("identity", -4.0, -4.0),
    ],
)
def test_activations_forward(name, x, y):
    net = Network.from_arrays([np.eye(1), np.eye(1)], name)
    assert net.forward(np.array([x]))[0] == pytest.approx(y, rel=1e-12)


@pytest.mark.parametrize(
    "name,alpha,beta",
    [("relu", 0, 1), ("tanh", 0, 1), ("sigmoid", 0, 0.25), ("leaky_relu:0.1", 0.1, 1), ("identity", 1, 1)],
)
def test_slope_bounds_hold_on_samples(name, alpha, beta):
    """The stored [alpha, beta] must contain every difference quotient of the real activation."""
    net = Network.from_arrays([np.eye(1), np.eye(1)], name)
    assert net.alphas[0][0] == alpha and net.betas[0][0] == beta
    x = np.random.default_rng(0).normal(0, 3, size=(4000, 1))
    y = net.forward(x)[:, 0]
    a, b = x[::2, 0], x[1::2, 0]
    q = (y[::2] - y[1::2]) / (a - b)
    assert q.min() >= alpha - 1e-12 and q.max() <= beta + 1e-12


def test_mixed_activations_per_layer():
    net = he_network([2, 3, 3, 3, 1], 0, ["relu", "tanh", "leaky_relu:0.3"])
    assert [a.name for a in net.activations] == ["relu", "tanh", "leaky_relu"]
    assert net.alphas[2][0] == pytest.approx(0.3)


def test_single_weight_network():
    net = Network.from_arrays([np.ones((2, 3))], [])
    assert net.depth == 0 and net.n_neurons == 0
    np.testing.assert_allclose(net.forward(np.ones(3)), [3.0, 3.0])


def test_one_dimensional_weight_is_a_row():
    net = Network.from_arrays([np.ones((4, 2)), np.ones(4)])
    assert net.sizes == [2, 4, 1]


@pytest.mark.parametrize(
    "weights,acts,match",
    [
        ([np.ones((3, 2)), np.ones((1, 4))], "relu", "takes 4 inputs"),
        ([np.ones((3, 2)), np.array([[1.0, np.nan, 0.0]])], "relu", "NaN"),
        ([np.ones((3, 2)), np.array([[1.0, np.inf, 0.0]])], "relu", "infinite"),
        ([np.ones((3, 2)), np.ones((1, 3))], "swish", "unknown activation 'swish'"),
        ([np.ones((3, 2)), np.ones((1, 3))], ["relu", "relu"], "need 1 hidden-layer"),
        ([], "relu", "no weight"),
        ([np.ones((2, 2, 2))], [], "2-D"),
        ([np.array([["a", "b"]])], [], "real numbers"),
        ([np.zeros((0, 3))], [], "empty"),
        ([np.ones((3, 2)), np.ones((1, 3))], "leaky_relu:abc", "not a number"),
        ([np.ones((3, 2)), np.ones((1, 3))], "leaky_relu:2", "negative slope"),
    ],
)
def test_invalid_networks(weights, acts, match):
    with pytest.raises(InvalidNetworkError, match=match):
        Network.from_arrays(weights, acts)


def test_invalid_biases():
    with pytest.raises(InvalidNetworkError, match="bias has 2 entries"):
        Network.from_arrays([np.ones((3, 2)), np.ones((1, 3))], "relu", [np.ones(2), None])
    with pytest.raises(InvalidNetworkError, match="bias contains NaN"):
        Network.from_arrays([np.ones((3, 2)), np.ones((1, 3))], "relu", [np.array([0, np.nan, 0]), None])
    with pytest.raises(InvalidNetworkError, match="2 weight matrices but 1 biases"):
        Network.from_arrays([np.ones((3, 2)), np.ones((1, 3))], "relu", [None])


def test_errors_are_lipsdp_errors():
    with pytest.raises(LipSDPError):
        Network.from_arrays([np.ones((3, 2)), np.ones((1, 4))])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_composes_back(k):
    """Running the pieces in turn, with the activation between them, reproduces the whole network."""
    net = he_network([3, 5, 4, 6, 2], 1, ["tanh", "relu", "sigmoid"], bias_scale=0.3)
    pieces = net.split(k)
    assert sum(len(p.weights) for p in pieces) == len(net.weights)
    x = np.random.default_rng(2).standard_normal((7, 3))
    h = x
    for i, piece in enumerate(pieces):
        h = piece.forward(h)
        if i < len(pieces) - 1:
            stop = (i + 1) * k
            from lipsdp.network import apply_activation

            h = apply_activation(net.activations[stop - 1], h)
    np.testing.assert_allclose(h, net.forward(x), rtol=1e-12)
    assert len(net.boundary_lipschitz(k)) == len(pieces) - 1


def test_boundary_lipschitz_of_sigmoid():
    net = he_network([2, 3, 3, 1], 0, "sigmoid")
    assert net.boundary_lipschitz(1) == [0.25, 0.25]


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_bad_split(k):
    with pytest.raises(InvalidNetworkError, match="positive integer"):
        he_network([2, 3, 1], 0).split(k)


def test_with_slopes_and_last_weight():
    net = he_network([2, 3, 1], 0)
    tight = net.with_slopes([np.full(3, 0.2)], [np.full(3, 0.8)])
    assert tight.alphas[0][0] == 0.2 and net.alphas[0][0] == 0.0
    with pytest.raises(InvalidNetworkError):
        net.with_slopes([np.full(3, 0.9)], [np.full(3, 0.1)])
    pair = net.with_last_weight(np.ones(3))
    assert pair.sizes == [2, 3, 1]
    with pytest.raises(InvalidNetworkError):
        net.with_last_weight(np.ones(4))
