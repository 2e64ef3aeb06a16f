"""Lower bounds: exact Jacobian norms at real points, reproducible, never above a verified upper bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import he_network
from torch import nn

import lipsdp
from lipsdp import Network
from lipsdp.lower import jacobian_norms, lower_bound


def finite_difference_jacobian(net: Network, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    cols = []
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        cols.append((net.forward(x + e) - net.forward(x - e)) / (2 * h))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softplus", "elu:0.7", ["tanh", "sigmoid", "softplus"]])
def test_jacobian_norm_matches_finite_differences(act):
    sizes = [3, 5, 4, 4, 2] if isinstance(act, list) else [3, 5, 4, 2]
    net = he_network(sizes, 4, act, bias_scale=0.5)
    points = np.random.default_rng(0).standard_normal((5, 3)) * 2
    ours = jacobian_norms(net, points)
    for x, value in zip(points, ours):
        assert value == pytest.approx(np.linalg.norm(finite_difference_jacobian(net, x), 2), rel=1e-6)


def test_relu_jacobian_is_the_active_submatrix_product():
    net = he_network([3, 6, 2], 8, bias_scale=1.0)
    points = np.random.default_rng(1).standard_normal((10, 3))
    w0, w1, b0 = net.weights[0], net.weights[1], net.biases[0]
    for x, value in zip(points, jacobian_norms(net, points)):
        active = (w0 @ x + b0) > 0
        assert value == pytest.approx(np.linalg.norm(w1[:, active] @ w0[active], 2), rel=1e-12)


def test_linear_network_lower_is_the_norm():
    w = np.random.default_rng(3).standard_normal((4, 6))
    lb = lower_bound(Network.from_arrays([w], []), samples=4)
    assert lb.value == pytest.approx(np.linalg.norm(w, 2), rel=1e-12)


def test_sigmoid_lower_finds_the_maximum():
    """diag(3, 1) sigmoid(2 x): L = 1.5 at x = 0; the ascent must get close to it."""
    net = Network.from_arrays([2.0 * np.eye(2), np.diag([3.0, 1.0])], "sigmoid")
    lb = lower_bound(net, seed=0)
    assert 1.5 * (1 - 1e-4) <= lb.value <= 1.5


def test_reproducible_for_a_fixed_seed():
    net = he_network([4, 10, 10, 3], 2, bias_scale=0.3)
    a = lower_bound(net, seed=7, samples=128, steps=30)
    b = lower_bound(net, seed=7, samples=128, steps=30)
    assert a.value == b.value
    np.testing.assert_array_equal(a.point, b.point)
    assert jacobian_norms(net, a.point[None])[0] == pytest.approx(a.value, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lower_at_most_upper(seed):
    net = he_network([3, 10, 10, 2], seed, bias_scale=0.5)
    res = lipsdp.estimate(net, "neuron", lower=True, seed=seed)
    assert 0 < res.lower <= res.upper
    assert res.ratio == pytest.approx(res.upper / res.lower)
    again = lipsdp.estimate(net, "neuron", lower=True, seed=seed)
    assert again.lower == res.lower


def test_lower_on_the_original_net(original_net, original_neuron):
    """The published LipSDP-Neuron value 36.482 is (numerically) attained: the 2-D net's Jacobian reaches
    it, so a good search gets within 1% of the verified bound."""
    lb = lower_bound(original_net, seed=0)
    assert original_neuron.upper * 0.99 <= lb.value <= original_neuron.upper


def test_composed_torch_activations():
    """Two activation modules in a row (ReLU then Tanh) act as one hidden layer; the lower bound must
    evaluate the real composition."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.LeakyReLU(0.1), nn.Tanh(), nn.Linear(4, 1)).double()
    net = lipsdp.load_network(model)
    x = np.random.default_rng(0).standard_normal((6, 2))
    with torch.no_grad():
        np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).numpy(), rtol=1e-12)
    xt = torch.from_numpy(x[:1]).requires_grad_(True)
    jac = torch.autograd.functional.jacobian(model, xt).reshape(1, 2)
    assert jacobian_norms(net, x[:1])[0] == pytest.approx(float(torch.linalg.norm(jac)), rel=1e-12)
    res = lipsdp.estimate(model, "neuron", lower=True)
    assert res.lower <= res.upper


def test_sparse_layers_give_the_dense_jacobians():
    """Layers mostly of zeros (lowered convolutions, max-pool comparators) are multiplied as sparse
    matrices: the Jacobian norms equal the active-submatrix products computed densely in numpy, and the
    ascent's best value is still below a verified upper bound."""
    from lipsdp.lower import SPARSE_MIN_SIZE

    rng = np.random.default_rng(3)
    n = 300
    w0 = rng.standard_normal((n, 40))
    w1 = rng.standard_normal((n, n)) * (rng.random((n, n)) < 0.02)
    w2 = rng.standard_normal((3, n))
    assert w1.size >= SPARSE_MIN_SIZE
    net = Network.from_arrays([w0, w1, w2], "relu", [rng.standard_normal(n), rng.standard_normal(n), None])
    points = rng.standard_normal((6, 40))
    for x, value in zip(points, jacobian_norms(net, points)):
        d0 = (w0 @ x + net.biases[0]) > 0
        d1 = (w1 @ np.maximum(w0 @ x + net.biases[0], 0) + net.biases[1]) > 0
        exact = np.linalg.norm(w2 @ (d1[:, None] * w1) @ (d0[:, None] * w0), 2)
        assert value == pytest.approx(exact, rel=1e-12)
    low = lower_bound(net, samples=16, steps=5).value
    assert 0 < low <= lipsdp.estimate(net, method="sequential").upper
