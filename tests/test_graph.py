"""Networks as graphs (lipsdp.graph): the lowering computes the graph's function exactly, and the bounds of
the lowered chain bracket exact constants computed independently (closed forms, linear-region
enumeration). Also the plumbing of layers with pass-through neurons (Mixed): forward, Jacobian lower
bounds, local slopes, .npz round trip, certificates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import exact_lipschitz_1d, exact_lipschitz_2d

import lipsdp
from lipsdp import InvalidNetworkError, LipSDPError, Network
from lipsdp.activations import Mixed, activation, mixed
from lipsdp.graph import Graph, to_network

METHODS = ("naive", "sequential", "layer", "neuron")


def residual_graph(n_in: int, width: int, blocks: int, seed: int, act: str = "relu") -> Graph:
    """x -> W x -> [h + V act(U h + c)] * blocks -> output row(s)."""
    rng = np.random.default_rng(seed)
    g = Graph(n_in)
    h = g.affine(0, rng.standard_normal((width, n_in)), rng.standard_normal(width))
    for _ in range(blocks):
        u = g.affine(h, rng.standard_normal((width, width)) / np.sqrt(width), rng.standard_normal(width))
        r = g.activation(u, act)
        v = g.affine(r, rng.standard_normal((width, width)) / np.sqrt(width))
        h = g.add([h, v])
    g.affine(h, rng.standard_normal((2, width)))
    return g


def random_dag(seed: int) -> Graph:
    """Skips over several layers, a concat with the input, a tanh branch beside relu ones, overlapping
    max-pool windows of uneven sizes, a constant, a diagonal map, a max pool after an activation."""
    rng = np.random.default_rng(seed)
    g = Graph(4)
    a = g.affine(0, rng.standard_normal((6, 4)), rng.standard_normal(6))
    r1 = g.activation(a, "relu")
    t = g.activation(g.affine(0, rng.standard_normal((3, 4))), "tanh")
    r2 = g.activation(g.affine(r1, rng.standard_normal((6, 6)), rng.standard_normal(6)), "relu")
    s = g.add([g.affine(r2, rng.standard_normal((6, 6))), a, g.affine(t, rng.standard_normal((6, 3)))])
    c = g.concat([s, 0, g.constant(rng.standard_normal(2))])
    m = g.maxpool(c, np.array([[0, 1, 2, -1, -1], [2, 3, 4, 5, 6], [7, 8, -1, -1, -1], [9, 0, 11, 1, -1],
                               [10, -1, -1, -1, -1], [5, 6, 7, 8, 9]]))
    d = g.affine(m, rng.uniform(0.5, 2.0, 6), rng.standard_normal(6))  # diagonal
    e = g.activation(d, "leaky_relu:0.1")
    p = g.maxpool(e, np.array([[0, 1], [2, 3], [4, 5]]))  # after an activation: fused
    g.affine(g.concat([p, r1]), rng.standard_normal((3, 9)), rng.standard_normal(3))
    return g


@pytest.mark.parametrize("seed", range(4))
def test_lowered_network_computes_the_graph(seed):
    for g in (random_dag(seed), residual_graph(3, 5, 3, seed), residual_graph(2, 4, 2, seed, act="tanh")):
        net = to_network(g)
        x = np.random.default_rng(seed).standard_normal((200, g.size(0))) * 3
        np.testing.assert_allclose(net.forward(x), g.forward(x), rtol=1e-10, atol=1e-10)


def test_layers_hold_one_activation_and_pass_through_neurons():
    net = to_network(random_dag(0))
    for act, a, b in zip(net.activations, net.alphas, net.betas):
        if isinstance(act, Mixed):
            assert np.all(a[act.mask()] == 1) and np.all(b[act.mask()] == 1)
            assert np.all(a[~act.mask()] == act.base.alpha) and np.all(b[~act.mask()] == act.base.beta)
    bases = [a.base.name if isinstance(a, Mixed) else a.name for a in net.activations]
    assert "tanh" in bases and "relu" in bases and "leaky_relu" in bases


def test_a_skip_is_carried_by_the_columns_it_reads_when_they_are_fewer():
    """h + V relu(U h) where h = W x is wide and x narrow: the pass-through neurons carry x, not h."""
    rng = np.random.default_rng(1)
    g = Graph(2)
    h = g.affine(0, rng.standard_normal((30, 2)))
    r = g.activation(g.affine(h, rng.standard_normal((30, 30))), "relu")
    g.add([h, g.affine(r, rng.standard_normal((30, 30)))])
    net = to_network(g)
    assert net.sizes == [2, 32, 30]
    assert net.activations[0].identity == (30, 31)


def test_identity_graph_and_constant_graph():
    g = Graph(3)
    np.testing.assert_array_equal(to_network(g).weights[0], np.eye(3))
    g.affine(g.concat([0, g.constant([5.0])]), np.ones((1, 4)))
    net = to_network(g)
    assert net.depth == 0
    np.testing.assert_allclose(net.forward(np.array([1.0, 2.0, 3.0])), [11.0])


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda g: g.add([0, g.affine(0, np.ones((2, 3)))]), "adds vectors of sizes"),
        (lambda g: g.maxpool(0, np.array([[0, 3]])), "index below 3"),
        (lambda g: g.maxpool(0, np.array([[-1, -1]])), "at least one entry"),
        (lambda g: g.affine(0, np.ones((2, 4))), "does not take the 3 values"),
        (lambda g: g.affine(0, np.array([[np.nan, 0, 0]])), "NaN"),
        (lambda g: g.activation(7, "relu"), "not earlier nodes"),
        (lambda g: g.activation(0, mixed(activation("relu"), [0], 3)), "applies to every entry"),
    ],
)
def test_malformed_graphs_are_refused(build, match):
    with pytest.raises(InvalidNetworkError, match=match):
        build(Graph(3))


# -- exact constants ------------------------------------------------------------------------------------
@pytest.mark.parametrize("w1,w2", [(2.0, 0.5), (2.0, -0.5), (1.0, -3.0), (-1.5, 2.0), (0.3, -0.2)])
def test_scalar_residual_closed_form(w1, w2):
    """f(x) = x + w2 relu(w1 x) has slopes 1 and 1 + w2 w1 on its two pieces: L = max(|1 + w2 w1|, 1)."""
    g = Graph(1)
    r = g.activation(g.affine(0, [[w1]]), "relu")
    g.add([0, g.affine(r, [[w2]])])
    net = to_network(g)
    exact = max(abs(1.0 + w2 * w1), 1.0)
    assert exact_lipschitz_1d(net) == pytest.approx(exact, rel=1e-12)
    for method in METHODS:
        res = lipsdp.estimate(net, method, lower=True, lower_samples=64, lower_steps=10)
        assert res.verified
        assert res.upper >= exact * (1 - 1e-12), method
        assert res.lower <= exact * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_residual_relu_nets_bracket_their_exact_constant(seed):
    """1-D and 2-D input residual nets: the exact constant by enumerating the linear regions of the lowered
    chain (it computes the same function as the DAG, checked against a direct evaluation)."""
    for n_in, exact_fn in ((1, exact_lipschitz_1d), (2, exact_lipschitz_2d)):
        g = residual_graph(n_in, 4, 2, 10 * seed + n_in)
        g.nodes[-1] = type(g.nodes[-1])("affine", g.nodes[-1].inputs, 1, "out", weight=g.nodes[-1].weight[:1],
                                        bias=np.zeros(1))
        net = to_network(g)
        x = np.random.default_rng(seed).uniform(-40, 40, (500, n_in))
        np.testing.assert_allclose(net.forward(x), g.forward(x), rtol=1e-10, atol=1e-9)
        exact = exact_fn(net)
        bounds = {m: lipsdp.estimate(net, m).upper for m in METHODS}
        lower = lipsdp.estimate(net, "naive", lower=True, lower_samples=256, lower_steps=30).lower
        assert lower <= exact * (1 + 1e-9)
        for method, upper in bounds.items():
            assert upper >= exact * (1 - 1e-9), (method, upper, exact)
        assert bounds["neuron"] <= bounds["naive"] * (1 + 1e-6)


def test_max_of_two_is_one_lipschitz():
    """max(x1, x2) = x2 + relu(x1 - x2): L = 1 exactly (gradients (1, 0) and (0, 1))."""
    g = Graph(2)
    g.maxpool(0, np.array([[0, 1]]))
    net = to_network(g)
    assert net.sizes == [2, 2, 1]
    x = np.random.default_rng(0).standard_normal((100, 2))
    np.testing.assert_allclose(net.forward(x)[:, 0], np.max(x, axis=1), rtol=1e-15, atol=1e-15)  # b + (a - b)
    bounds = {m: lipsdp.estimate(net, m).upper for m in METHODS}
    assert all(b >= 1.0 for b in bounds.values()), bounds
    assert bounds["neuron"] <= 1.0 + 1e-3, bounds
    print("max(x1, x2):", bounds)


# -- pass-through layers in the rest of lipsdp ----------------------------------------------------------
def small_mixed_net() -> Network:
    return to_network(residual_graph(3, 4, 2, 5))


def test_mixed_activation_and_its_checks():
    act = mixed(activation("relu"), [2, 0], 4)
    assert isinstance(act, Mixed) and act.identity == (0, 2) and act.label() == "relu|identity"
    assert mixed(activation("relu"), [], 4) == activation("relu")
    assert mixed(activation("tanh"), [0, 1], 2) == activation("identity")
    assert act.select(np.array([True, True, False, False])).identity == (0,)
    assert act.select(np.array([1, 3])) == activation("relu")
    with pytest.raises(InvalidNetworkError, match="plain activation"):
        mixed(Mixed("x", 0, 1, None, activation("relu"), (0,), 2), [0], 2)
    with pytest.raises(InvalidNetworkError, match="0..3"):
        mixed(activation("relu"), [4], 4)
    with pytest.raises(InvalidNetworkError, match="layer of 5"):
        Network.from_arrays([np.ones((5, 2)), np.ones((1, 5))], [act])


def test_jacobian_lower_bound_of_a_mixed_net():
    net = small_mixed_net()
    from lipsdp.lower import jacobian_norms

    x = np.random.default_rng(3).standard_normal((5, 3))
    eps = 1e-6
    for point, norm in zip(x, jacobian_norms(net, x)):
        jac = np.stack([(net.forward(point + eps * e) - net.forward(point - eps * e)) / (2 * eps)
                        for e in np.eye(3)], axis=1)
        assert norm == pytest.approx(np.linalg.norm(jac, 2), rel=1e-5)


def test_local_bounds_of_a_mixed_net_keep_pass_through_neurons():
    from lipsdp.region import Box, localize

    net = small_mixed_net()
    local = localize(net, Box(-0.05, 0.05))
    assert local.removed > 0  # some relu neurons are off on the small box
    for act, alpha, beta in zip(local.network.activations, local.network.alphas, local.network.betas):
        if isinstance(act, Mixed):
            assert act.size == alpha.size and np.all(alpha[act.mask()] == 1) and np.all(beta[act.mask()] == 1)
    x = np.random.default_rng(0).uniform(-0.05, 0.05, (50, 3))
    np.testing.assert_allclose(local.network.forward(x), net.forward(x), rtol=1e-10, atol=1e-12)
    res = lipsdp.estimate(net, "neuron", region=Box(-0.05, 0.05), lower=True, lower_samples=64, lower_steps=5)
    assert res.lower <= res.upper <= lipsdp.estimate(net, "neuron").upper * (1 + 1e-9)


def test_npz_round_trip_and_mat_refusal(tmp_path):
    from lipsdp.io.arrays import save_mat, save_npz

    net = small_mixed_net()
    save_npz(net, tmp_path / "m.npz")
    back = lipsdp.io.load_network(tmp_path / "m.npz")
    assert [a.label() for a in back.activations] == [a.label() for a in net.activations]
    assert [getattr(a, "identity", None) for a in back.activations] == [getattr(a, "identity", None)
                                                                         for a in net.activations]
    for a, b in zip(net.weights + net.biases + net.alphas + net.betas, back.weights + back.biases + back.alphas
                    + back.betas):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(LipSDPError, match="pass-through or.*save the network as .npz"):
        save_mat(net, tmp_path / "m.mat")


def test_pruning_dead_neurons_of_a_mixed_layer():
    from lipsdp.scaling import prune_dead_neurons

    net = small_mixed_net()
    w = [x.copy() for x in net.weights]
    w[1][:, 0] = 0.0  # neuron 0 of hidden layer 1 unused; layer 2 keeps its pass-through neurons
    dead = Network.from_arrays(w, list(net.activations), list(net.biases))
    pruned = prune_dead_neurons(dead)
    assert pruned.hidden_sizes[0] == net.hidden_sizes[0] - 1
    x = np.random.default_rng(0).standard_normal((20, 3))
    np.testing.assert_allclose(pruned.forward(x), dead.forward(x), rtol=1e-12, atol=1e-12)
    assert lipsdp.estimate(dead, "sequential").upper == pytest.approx(lipsdp.estimate(pruned, "sequential").upper)


@pytest.mark.parametrize("method", ["naive", "sequential", "neuron"])
def test_certificate_of_a_lowered_net_is_re_proved(tmp_path, method):
    from lipsdp.io.arrays import save_npz

    net = small_mixed_net()
    save_npz(net, tmp_path / "m.npz")
    res = lipsdp.estimate(tmp_path / "m.npz", method)
    res.save_certificate(tmp_path / "m.cert.json")
    check = lipsdp.verify(tmp_path / "m.cert.json", tmp_path / "m.npz")
    assert check.accepted, check.reason
    local = lipsdp.estimate(tmp_path / "m.npz", method, region=lipsdp.Box(-0.1, 0.1))
    local.save_certificate(tmp_path / "local.cert.json")
    check = lipsdp.verify(tmp_path / "local.cert.json", tmp_path / "m.npz")
    assert check.accepted, check.reason


def test_every_entry_point_bounds_a_lowered_net_soundly():
    """anytime, split, pair, region and certify on a lowered 2-D residual net: each bound is at least the
    exact constant of what it bounds (linear-region enumeration of the lowered chain)."""
    from lipsdp.network import pair_network

    g = residual_graph(2, 4, 2, 21)
    net = to_network(g)
    exact_pair = exact_lipschitz_2d(pair_network(net, (0, 1)))
    exact_first = exact_lipschitz_2d(net.with_last_weight(net.weights[-1][:1], net.biases[-1][:1]))
    full = lipsdp.estimate(net, "sequential").upper
    assert lipsdp.estimate(net, "anytime", budget=2).upper >= exact_first * (1 - 1e-9)
    assert lipsdp.estimate(net, "sequential", split=1).upper >= full * (1 - 1e-9)
    assert lipsdp.estimate(net, "neuron", pair=(0, 1)).upper >= exact_pair * (1 - 1e-9)
    local = lipsdp.estimate(net, "neuron", region=lipsdp.Box(-1.0, 1.0), pair=(0, 1))
    assert local.upper <= lipsdp.estimate(net, "neuron", pair=(0, 1)).upper * (1 + 1e-9)
    x = np.random.default_rng(0).standard_normal((10, 2))
    y = np.argmax(g.forward(x), axis=1)
    cert = lipsdp.certify(net, x, y, method="sequential")
    assert np.all(cert.radii >= 0)
    for xi, r in zip(x, cert.radii):  # no label change inside the certified radius (sampled)
        d = np.random.default_rng(1).standard_normal((200, 2))
        pts = xi + 0.999 * r * d / np.linalg.norm(d, axis=1, keepdims=True)
        assert np.all(np.argmax(g.forward(pts), axis=1) == np.argmax(g.forward(xi)))
