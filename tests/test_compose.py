"""Bounds composed at max pooling (lipsdp.compose): the parts compute the graph, the pool constant sqrt(m)
is exact where it can be, the weighted pools' inequality holds on samples and their parts compute the
weighted maps exactly, every composed bound is at least the exact constant of small nets (linear-region
enumeration of the exact lowering) and weighting never loosens the naive product, and `lipsdp verify`
re-proves a composed certificate and rejects a pool constant below sqrt(m) or a weight below its sum."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import exact_lipschitz_2d

import lipsdp
from lipsdp import compose
from lipsdp.compose import (
    PoolWeights,
    _incidence,
    _input_exponents,
    factoring_pools,
    lower,
    multiplicity,
    pool_lipschitz,
    weighted_parts,
    weights_hold,
)
from lipsdp.graph import Graph, to_network
from lipsdp.network import pair_network
from lipsdp.verify import verify

METHODS = ("naive", "sequential", "layer", "neuron")
CNN = Path(__file__).resolve().parents[2] / "shared" / "realnets" / "cnn"


def pooled_graph(seed: int, fused: bool = True) -> Graph:
    """x (2) -> affine (6) -> relu -> overlapping max pools (windows of 2 and 3; entry 2 in three windows)
    -> affine (4) -> relu -> affine (3)."""
    rng = np.random.default_rng(seed)
    g = Graph(2)
    z = g.affine(0, rng.standard_normal((6, 2)), rng.standard_normal(6))
    v = g.activation(z, "relu") if fused else z
    p = g.maxpool(v, np.array([[0, 1, 2], [2, 3, -1], [2, 4, 5], [5, 5, 1]]))
    h = g.activation(g.affine(p, rng.standard_normal((4, 4)), rng.standard_normal(4)), "relu")
    g.affine(h, rng.standard_normal((3, 4)), rng.standard_normal(3))
    return g


def apply_pool(x: np.ndarray, windows: np.ndarray) -> np.ndarray:
    return np.where(windows >= 0, x[..., np.maximum(windows, 0)], -np.inf).max(axis=-1)


def test_multiplicity_counts_windows_per_entry():
    assert multiplicity(np.array([[0, 1], [2, 3]])) == 1
    assert multiplicity(np.array([[0, 1, 2], [2, 3, -1], [2, 4, 5], [5, 5, 1]])) == 3  # 2 in three; 5 twice in one
    # 3x3 windows, stride 2, on a 7x7 image: the entries at odd-odd... even-even interior corners lie in 4
    idx = np.arange(49).reshape(7, 7)
    windows = np.array([idx[r:r + 3, c:c + 3].ravel() for r in range(0, 5, 2) for c in range(0, 5, 2)])
    assert multiplicity(windows) == 4


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 9, 10, 1000, 2**40 + 1])
def test_pool_lipschitz_is_the_smallest_float_above_sqrt_m(m):
    c = pool_lipschitz(m)
    assert Fraction(c) ** 2 >= m
    assert Fraction(math.nextafter(c, 0.0)) ** 2 < m


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fused", [True, False])
def test_parts_compute_the_graph(seed, fused):
    g = pooled_graph(seed, fused)
    net = lower(g)
    comp = net.composition
    assert comp is not None and comp.applies_to(net) and comp.multiplicities == (3,)
    assert len(factoring_pools(g)) == 1
    x = np.random.default_rng(seed).standard_normal((300, 2)) * 3
    first, second = comp.parts
    windows = g.nodes[factoring_pools(g)[0][0]].windows
    np.testing.assert_allclose(second.forward(apply_pool(first.forward(x), windows)), g.forward(x), rtol=1e-12, atol=1e-12)
    if fused:  # the relu moved after the pool: the first part is the affine map alone
        assert first.depth == 0


@pytest.mark.parametrize("seed", range(4))
def test_weighted_pool_inequality_holds_and_is_checked_exactly(seed):
    """|D (P(u) - P(v))| <= |S (u - v)| for the smallest sigma_j = 4^f_j >= sum of the tau_i of j's windows
    (overlapping windows, repeated and absent entries, an entry no window reads), on random pairs; lowering
    a weight that is tight refuses."""
    rng = np.random.default_rng(seed)
    n_in = 12
    windows = rng.integers(-1, n_in - 1, size=(7, 4))  # entry n_in - 1 is read by no window
    windows[:, 0] = rng.integers(0, n_in - 1, size=7)
    e = rng.integers(-3, 4, size=7)
    f = _input_exponents(_incidence(windows, n_in), e)
    w = PoolWeights(tuple(int(x) for x in e), f)
    assert weights_hold(windows, n_in, w) is None and f[-1] is None
    d = np.ldexp(1.0, e)
    s = np.array([0.0 if x is None else math.ldexp(1.0, x) for x in f])
    for _ in range(200):
        u, v = rng.standard_normal((2, n_in)) * rng.uniform(0.1, 10)
        same = rng.random(n_in) < 0.3  # entries that do not move (where the max norm is tight)
        v[same] = u[same]
        lhs = np.linalg.norm(d * (apply_pool(u, windows) - apply_pool(v, windows)))
        assert lhs <= np.linalg.norm(s * (u - v)) * (1 + 1e-12)
    read = [j for j in range(n_in) if f[j] is not None]
    tight = [j for j in read if 4.0 ** (f[j] - 1) < sum(4.0 ** e[i] for i in range(7) if j in set(windows[i]))]
    assert tight  # the smallest f_j: one less is below the sum
    lowered = list(f)
    lowered[tight[0]] -= 1
    assert "below the sum" in weights_hold(windows, n_in, PoolWeights(w.out_exponents, tuple(lowered)))
    zeroed = list(f)
    zeroed[read[0]] = None
    assert "weight is zero" in weights_hold(windows, n_in, PoolWeights(w.out_exponents, tuple(zeroed)))


@pytest.mark.parametrize("fused", [True, False])
def test_weighted_parts_compute_the_weighted_maps(fused):
    """S o g_0 and g_1 o D^-1 exactly: the first part's outputs times 2^f (0 where unread), and the second
    part on D P(.) gives the graph's output (the scaling moved through the relu when it was fused)."""
    g = pooled_graph(3, fused)
    comp = lower(g).composition
    windows = comp.windows[0]
    e = (1, 0, -1, 2)
    w = PoolWeights(e, _input_exponents(_incidence(windows, comp.parts[0].sizes[-1]), np.array(e)))
    first, second = weighted_parts(comp, (w,))
    x = np.random.default_rng(0).standard_normal((200, 2)) * 3
    s = np.array([0.0 if f is None else math.ldexp(1.0, f) for f in w.in_exponents])
    np.testing.assert_array_equal(first.forward(x), comp.parts[0].forward(x) * s)
    pooled = apply_pool(comp.parts[0].forward(x), windows)
    np.testing.assert_allclose(second.forward(np.ldexp(pooled, e)), g.forward(x), rtol=1e-12, atol=1e-12)
    if fused:  # D^-1 went through the relu onto the next weight: the identity first layer stays
        np.testing.assert_array_equal(second.weights[0], np.eye(4))


def test_a_pool_that_does_not_factor_the_graph_is_lowered_exactly():
    """A skip connection around the pool: no factoring, the exact lowering only."""
    rng = np.random.default_rng(0)
    g = Graph(2)
    z = g.affine(0, rng.standard_normal((4, 2)))
    p = g.maxpool(z, np.array([[0, 1], [2, 3]]))
    g.affine(g.concat([p, z]), rng.standard_normal((2, 6)))
    assert factoring_pools(g) == [] and lower(g).composition is None


def test_the_pool_constant_is_exact_when_one_entry_feeds_every_window():
    """x -> I x -> windows {0,1}, {0,2}, {0,3} -> I: moving x_0 alone moves every output, L = sqrt(3)."""
    g = Graph(4)
    z = g.affine(0, np.eye(4))
    p = g.maxpool(z, np.array([[0, 1], [0, 2], [0, 3]]))
    g.affine(p, np.eye(3))
    for method in METHODS:
        upper = lipsdp.estimate(lower(g), method=method).upper
        assert math.sqrt(3) <= upper <= math.sqrt(3) * (1 + 1e-9), method
    x, d = np.array([1.0, 0.0, 0.0, 0.0]), np.array([1e-3, 0, 0, 0])
    assert np.linalg.norm(g.forward(x + d) - g.forward(x)) / 1e-3 == pytest.approx(math.sqrt(3), rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_composed_bounds_are_above_the_exact_constant(seed, monkeypatch):
    """Weighted where the weights help (seeds 0, 3, 5, 7), never a naive product above the plain one."""
    g = pooled_graph(seed)
    net = lower(g)
    exact = exact_lipschitz_2d(to_network(g))
    exact_pair = exact_lipschitz_2d(pair_network(to_network(g), (0, 2)))
    naive = lipsdp.estimate(net, method="naive")
    with monkeypatch.context() as m:
        m.setattr(compose, "choose_weights", lambda comp, **kw: None)
        plain = lipsdp.estimate(net, method="naive")
    assert exact * (1 - 1e-9) <= naive.upper <= plain.upper and not plain.proof.pools
    if seed in (0, 3):  # the weights pay off: 27.97 -> 19.34 and 63.84 -> 37.08
        assert naive.proof.pools and naive.upper < 0.75 * plain.upper
    for method in METHODS:
        result = lipsdp.estimate(net, method=method)
        assert result.proof.kind == "compose" and result.pieces == 2
        assert result.upper >= exact * (1 - 1e-9), method
        pair = lipsdp.estimate(net, method=method, pair=(0, 2))
        assert pair.upper >= exact_pair * (1 - 1e-9), method
        exact_chain = lipsdp.estimate(net, method=method, pools="exact")
        assert exact_chain.proof.kind != "compose" and exact_chain.upper >= exact * (1 - 1e-9)


def test_a_derived_network_is_never_composed():
    net = lower(pooled_graph(0))
    derived = pair_network(net, (0, 1))
    assert derived.composition is None or not derived.composition.applies_to(derived)
    local = lipsdp.estimate(net, method="naive", region=lipsdp.Ball(np.zeros(2), 0.5))
    assert local.proof.kind != "compose"


def test_bad_pools_option_is_one_clear_error():
    with pytest.raises(lipsdp.LipSDPError, match="pools must be 'compose' or 'exact'"):
        lipsdp.estimate(lower(pooled_graph(0)), method="naive", pools="dense")


@pytest.mark.parametrize("pair", [None, (1, 0)])
def test_verify_reproves_a_composed_certificate_and_rejects_a_low_pool_constant(tmp_path, pair):
    net = lower(pooled_graph(1))
    result = lipsdp.estimate(net, method="sequential", pair=pair)
    cert = result.save_certificate(tmp_path / "c.json")
    check = verify(cert, net)
    assert check.accepted, check.reason
    assert check.proven <= result.upper
    data = json.loads(cert.read_text())
    data["proof"]["lipschitz"] = [float.hex(math.sqrt(3) * (1 - 1e-12))]  # below sqrt(3): refused
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    check = verify(bad, net)
    assert not check.accepted and "below sqrt(3)" in check.reason
    if pair is None:  # weighted pools (seed 3): accepted; a weight below its sum, a constant below 1 refused
        net = lower(pooled_graph(3))
        result = lipsdp.estimate(net, method="sequential")
        assert result.proof.pools
        weighted = result.save_certificate(tmp_path / "w.json")
        check = verify(weighted, net)
        assert check.accepted and check.proven <= result.upper, check.reason
        data = json.loads(weighted.read_text())
        f = data["proof"]["pools"][0]["in_exponents"]
        f[2] -= 1  # entry 2 lies in three windows: its weight is tight
        bad.write_text(json.dumps(data))
        check = verify(bad, net)
        assert not check.accepted and "below the sum" in check.reason
        data = json.loads(weighted.read_text())
        data["proof"]["lipschitz"] = [float.hex(0.5)]
        bad.write_text(json.dumps(data))
        check = verify(bad, net)
        assert not check.accepted and "below sqrt(1)" in check.reason
        net = lower(pooled_graph(1))
    # the same certificate for the exact lowering (no composition): refused, not crashed
    check = verify(cert, to_network(pooled_graph(1)))
    assert not check.accepted and "not factored by max pools" in check.reason


@pytest.mark.skipif(not (CNN / "Convnet_maxpool.onnx").exists(), reason="../shared/realnets absent")
def test_convnet_maxpool_composed_naive_is_far_below_the_lowered_product():
    """4x4 max pooling: 402722 from the lowered chain's product; the composed product is below 600 (597.9
    unweighted) and below 500 with weighted pools (490.2), and above a sampled Jacobian norm."""
    from lipsdp.lower import lower_bound

    net = lipsdp.load_network(CNN / "Convnet_maxpool.onnx")
    assert net.composition is not None and net.composition.multiplicities == (1,)
    result = lipsdp.estimate(net, method="naive")
    assert result.proof.kind == "compose" and result.proof.pools
    low = lower_bound(net, samples=4, steps=5).value
    assert 100.0 < low <= result.upper < 500.0
