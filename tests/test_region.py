"""Local bounds over input regions: interval propagation is sound, slopes are right, and the local bound
sits between the Jacobian norms sampled inside the region and the global bound."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import he_network

import lipsdp
from lipsdp import Ball, Box, LipSDPError
from lipsdp.lower import jacobian_norms
from lipsdp.network import Network, apply_activation
from lipsdp.region import localize, pre_activation_bounds, slope_range

RNG = np.random.default_rng(0)


def pre_activations(net: Network, x: np.ndarray) -> list[np.ndarray]:
    out, h = [], x
    for k in range(net.depth):
        z = h @ net.weights[k].T + net.biases[k]
        out.append(z)
        h = apply_activation(net.activations[k], z)
    return out


# -- regions ------------------------------------------------------------------------------------------


def test_box_sample_and_project():
    box = Box([-1.0, 0.0, 2.0], [1.0, 0.5, 2.0])
    pts = box.sample(500, RNG)
    assert np.all(box.contains(pts))
    far = RNG.standard_normal((50, 3)) * 10
    proj = box.project(far)
    assert np.all(box.contains(proj))
    np.testing.assert_array_equal(box.project(proj), proj)
    inside = box.sample(10, RNG)
    np.testing.assert_array_equal(box.project(inside), inside)
    assert Box(0, 1).with_dim(4).low.shape == (4,)
    with pytest.raises(LipSDPError, match="low"):
        Box([1.0, 2.0], [0.0, 3.0])
    with pytest.raises(LipSDPError, match="3 entries but the network has 2"):
        box.with_dim(2)


def test_ball_sample_and_project():
    ball = Ball([1.0, -2.0, 0.5], 0.3)
    pts = ball.sample(500, RNG)
    assert np.all(ball.contains(pts))
    # Uniform in the ball: the fraction within half the radius is about 1/8 in 3-D.
    frac = np.mean(np.linalg.norm(pts - ball.center, axis=1) <= 0.15)
    assert 0.06 < frac < 0.2
    proj = ball.project(RNG.standard_normal((50, 3)) * 10)
    assert np.all(ball.contains(proj))
    np.testing.assert_allclose(np.linalg.norm(proj - ball.center, axis=1), 0.3, rtol=1e-9)
    with pytest.raises(LipSDPError, match="eps"):
        Ball([0.0], -1.0)


# -- interval propagation and slopes ------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "softplus", "elu:1.5", "leaky_relu:0.1"])
@pytest.mark.parametrize("region", [Box([-0.5, 0.2, 0.0], [0.5, 0.9, 0.1]), Ball([0.3, -0.4, 1.0], 0.5)])
def test_interval_bounds_contain_every_sampled_pre_activation(act, region):
    net = he_network([3, 8, 8, 2], seed=3, activation=act, bias_scale=0.5)
    bounds = pre_activation_bounds(net, region)
    pts = np.vstack([region.sample(2000, RNG), region.project(RNG.standard_normal((200, 3)) * 5)])
    for (lo, hi), z in zip(bounds, pre_activations(net, pts)):
        assert np.all(z >= lo) and np.all(z <= hi)


@pytest.mark.parametrize("act,param", [("relu", None), ("leaky_relu", 0.2), ("tanh", None), ("sigmoid", None),
                                       ("softplus", None), ("elu", 0.5), ("elu", 2.0)])
def test_slope_range_brackets_the_derivative(act, param):
    """[alpha, beta] contains every difference quotient inside the interval, and the extremes are attained."""
    from lipsdp.activations import activation

    phi = activation(act, param)
    lo = RNG.uniform(-4, 3, 200)
    hi = lo + RNG.uniform(0, 3, 200)
    alpha, beta = slope_range(act, param, lo, hi)
    for a, b, low, high in zip(alpha, beta, lo, hi):
        grid = np.linspace(low, high, 401)
        q = np.diff(apply_activation(phi, grid)) / np.diff(grid)
        assert np.all(q >= a - 1e-6) and np.all(q <= b + 1e-6)
        assert q.min() <= a + 0.05 and q.max() >= b - 0.05  # tight up to the grid spacing


def test_local_network_drops_constant_neurons_and_agrees_on_the_region():
    net = he_network([2, 12, 12, 2], seed=5, bias_scale=1.0)
    region = Ball([-0.5, 0.5], 0.05)
    local = localize(net, region)
    assert local.removed > 0 and local.network.n_neurons == net.n_neurons - local.removed
    pts = region.sample(500, RNG)
    np.testing.assert_allclose(local.network.forward(pts), net.forward(pts), rtol=1e-12, atol=1e-12)


# -- local bounds ---------------------------------------------------------------------------------------


def sampled_jacobian_max(net: Network, region, n: int = 3000) -> float:
    return float(jacobian_norms(net, region.sample(n, RNG)).max())


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("method", ["neuron", "layer", "sequential"])
def test_local_bound_between_region_jacobians_and_global_bound(act, method):
    net = he_network([2, 12, 12, 2], seed=5, activation=act, bias_scale=1.0)
    global_bound = lipsdp.estimate(net, method).upper
    for region in (Box([0.2, -0.3], [0.6, 0.1]), Ball([-0.5, 0.5], 0.3)):
        local = lipsdp.estimate(net, method, region=region)
        assert sampled_jacobian_max(net, region) <= local.upper <= global_bound * (1 + 1e-7)
        assert "region" in local.notes[0]
    # A small region makes a clear difference.
    small = lipsdp.estimate(net, method, region=Ball([-0.5, 0.5], 0.05)).upper
    assert small < 0.9 * global_bound


def test_local_bound_inside_one_linear_region_is_the_jacobian_norm():
    """Every ReLU fixed on a tiny box: the network is affine there, the bound is ||J|| exactly."""
    net = he_network([3, 10, 8, 2], seed=7, bias_scale=1.0)
    centre = np.array([0.3, -0.2, 0.5])
    region = Box(centre - 1e-4, centre + 1e-4)
    local = localize(net, region)
    assert local.fixed == net.n_neurons
    truth = float(jacobian_norms(net, centre[None])[0])
    for method in ("neuron", "layer", "sequential", "naive"):
        upper = lipsdp.estimate(net, method, region=region).upper
        assert truth <= upper <= truth * (1 + 1e-6)


def test_local_bound_holds_for_pairs_of_points():
    """|f(x) - f(y)| <= L ||x - y|| for x, y in the region (the definition, checked directly)."""
    net = he_network([2, 10, 10, 3], seed=11, activation="tanh", bias_scale=0.8)
    region = Ball([0.4, -0.1], 0.4)
    upper = lipsdp.estimate(net, "neuron", region=region).upper
    x, y = region.sample(5000, RNG), region.sample(5000, RNG)
    ratio = np.linalg.norm(net.forward(x) - net.forward(y), axis=1) / np.linalg.norm(x - y, axis=1)
    assert ratio.max() <= upper


def test_nested_regions_give_nested_bounds():
    net = he_network([2, 10, 10, 2], seed=2, activation="sigmoid", bias_scale=1.0)
    bounds = [lipsdp.estimate(net, "neuron", region=Ball([0.1, 0.2], eps)).upper for eps in (0.05, 0.2, 1.0, 5.0)]
    assert all(a <= b * (1 + 1e-6) for a, b in itertools.pairwise(bounds))
    assert bounds[-1] <= lipsdp.estimate(net, "neuron").upper * (1 + 1e-6)


def test_lower_bound_searches_inside_the_region():
    net = he_network([2, 12, 12, 2], seed=5, bias_scale=1.0)
    region = Box([0.2, -0.3], [0.6, 0.1])
    res = lipsdp.estimate(net, "neuron", region=region, lower=True, lower_samples=256, lower_steps=30)
    assert region.contains(res.lower_point)
    assert res.lower <= res.upper
    assert res.lower == pytest.approx(float(jacobian_norms(net, res.lower_point[None])[0]), rel=1e-12)


def test_region_and_pair_and_split_combine():
    net = he_network([2, 8, 8, 8, 3], seed=4, activation="tanh", bias_scale=0.5)
    region = Ball([0.0, 0.3], 0.2)
    whole = lipsdp.estimate(net, "layer", region=region, pair=(0, 2)).upper
    pieces = lipsdp.estimate(net, "layer", region=region, pair=(0, 2), split=2).upper
    assert whole <= pieces * (1 + 1e-6)
    assert sampled_jacobian_max(lipsdp.robustness.pair_network(net, (0, 2)), region) <= whole


def test_region_dimension_mismatch():
    net = he_network([2, 4, 2], seed=0)
    with pytest.raises(LipSDPError, match="3 entries"):
        lipsdp.estimate(net, "naive", region=Ball([0.0, 0.0, 0.0], 1.0))
    with pytest.raises(LipSDPError, match="Box or lipsdp.Ball"):
        lipsdp.estimate(net, "naive", region=(0.0, 1.0))


def test_cli_box_ball_pair(tmp_path):
    from typer.testing import CliRunner

    from lipsdp.cli import app
    from lipsdp.io.arrays import save_npz

    net = he_network([2, 6, 6, 3], seed=9, bias_scale=1.0)
    save_npz(net, tmp_path / "net.npz")
    np.save(tmp_path / "point.npy", np.array([0.2, -0.1]))
    runner = CliRunner()
    model = str(tmp_path / "net.npz")
    box = runner.invoke(app, ["estimate", model, "-m", "layer", "--box", "0.1", "0.3", "--json"])
    assert box.exit_code == 0, box.output
    assert json.loads(box.output)["upper"] == pytest.approx(
        lipsdp.estimate(net, "layer", region=Box(0.1, 0.3)).upper, rel=1e-9
    )
    ball = runner.invoke(app, ["estimate", model, "-m", "layer", "--ball", str(tmp_path / "point.npy"), "0.1",
                               "--pair", "0", "2", "--json"])
    assert ball.exit_code == 0, ball.output
    expected = lipsdp.estimate(net, "layer", region=Ball([0.2, -0.1], 0.1), pair=(0, 2)).upper
    assert json.loads(ball.output)["upper"] == pytest.approx(expected, rel=1e-9)
    both = runner.invoke(app, ["estimate", model, "--box", "0", "1", "--ball", str(tmp_path / "point.npy"), "1"])
    assert both.exit_code == 2
