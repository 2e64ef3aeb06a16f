"""Wide hidden layers eliminated from the LMI of a chain (`lipsdp.reduced`): the reduced matrix against the
dense Schur complement of the full LMI, the implicit sequential multipliers against the explicit ones, the
proven bound against the full path and exact constants, and the elimination plan's rules."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from conftest import he_network
from test_certificate import dense_m

import lipsdp
from lipsdp import Network, reduced, weights
from lipsdp.certificate import certify
from lipsdp.lmi import schur_rho, sequential_multipliers
from lipsdp.memory import block_entries
from lipsdp.network import sparse_weights
from lipsdp.reduced import along_ray

# widths chosen so that min_width=1 eliminates layers 1 and 4 (each at least as wide as both neighbours)
SIZES = [5, 12, 4, 6, 14, 3, 2]
MIXED = ["relu", "relu", "leaky_relu:0.1", "relu", "relu"]


def _offsets(net: Network) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(net.sizes[:-1])])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reduced_lmi_is_the_schur_complement_of_the_full_one(seed):
    """F' over the kept layers equals -M(0, T)'s Schur complement on the eliminated blocks (written out from
    the design formulas, independently of lipsdp.lmi), and rho*(T) is the full LMI's."""
    net = he_network(SIZES, seed, MIXED)
    gone = reduced.plan(net, min_width=1)
    assert gone == (1, 4)
    rng = np.random.default_rng(seed)
    t = sequential_multipliers(net) * np.exp(rng.uniform(0.0, 0.5, net.n_neurons))
    f = -dense_m(net, 0.0, t)
    o = _offsets(net)
    red = reduced.Reduction(net, gone)
    keep = np.concatenate([np.arange(o[k], o[k + 1]) for k in red.kept])
    drop = np.concatenate([np.arange(o[j], o[j + 1]) for j in gone])
    schur = f[np.ix_(keep, keep)] - f[np.ix_(keep, drop)] @ np.linalg.solve(f[np.ix_(drop, drop)], f[np.ix_(drop, keep)])
    formed, _ = red.forms(t)
    assert np.max(np.abs(formed.dense() - schur)) <= 1e-12 * np.max(np.abs(schur))
    full = schur_rho(net, t)
    assert full is not None and red.rho(t) == pytest.approx(full, rel=1e-10)


def test_absolute_row_sums_cover_the_absolute_formulas():
    """The row sums that size the rounding margin bound those of |F'|_abs, the reduced formulas written out
    densely on |W|, |t| and |a + b| (each term's magnitude, before any cancellation)."""
    net = he_network(SIZES, 3, "relu")
    gone = reduced.plan(net, min_width=1)
    t = sequential_multipliers(net)
    red = reduced.Reduction(net, gone)
    _, sums = red.forms(t)
    ws = [np.abs(w) for w in net.weights]
    ts = [None] + np.split(t, np.cumsum(net.hidden_sizes)[:-1])
    c = [None] + [np.abs(a + b) for a, b in zip(net.alphas, net.betas)]
    kept, l = red.kept, net.depth
    blocks = {}
    for p in kept:
        d = np.zeros((net.sizes[p], net.sizes[p]))
        if p == l:
            d += ws[l].T @ ws[l]
        if p > 0:
            d += np.diag(2.0 * ts[p])
        if p + 1 in gone:
            d += 0.5 * ws[p].T @ np.diag(c[p + 1] ** 2 * ts[p + 1]) @ ws[p]
        if p - 1 in gone:
            ct = np.diag(c[p] * ts[p])
            d += 0.5 * ct @ ws[p - 1] @ np.diag(1.0 / ts[p - 1]) @ ws[p - 1].T @ ct
        blocks[p, p] = d
    for p, q in pairwise(kept):
        ct = np.diag(c[q] * ts[q])
        blocks[p, q] = ws[p].T @ ct if q == p + 1 else 0.5 * ws[p].T @ np.diag(c[p + 1]) @ ws[p + 1].T @ ct
    rows = []
    for i, p in enumerate(kept):
        r = blocks[p, p].sum(axis=1)
        if i + 1 < len(kept):
            r = r + blocks[p, kept[i + 1]].sum(axis=1)
        if i > 0:
            r = r + blocks[kept[i - 1], p].sum(axis=0)
        rows.append(r)
    exact = np.concatenate(rows)
    assert np.all(sums >= exact)
    assert np.max(sums / exact) < 1.0 + 1e-12


@pytest.mark.parametrize("seed", [0, 4])
def test_implicit_sequential_multipliers_are_the_explicit_ones(seed):
    """Woodbury on the implicit quadratic form of each eliminated layer gives the same tau per layer."""
    net = he_network(SIZES, seed, MIXED, bias_scale=0.3)
    gone = reduced.plan(net, min_width=1)
    assert np.allclose(reduced.sequential_multipliers(net, gone), sequential_multipliers(net), rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 5])
def test_proven_bound_equals_the_full_path_and_bounds_the_truth(seed, monkeypatch):
    """With elimination on (MIN_WIDTH lowered) the proof is made on F' and gives the full path's bound; it
    is above the exact constant of a nonnegative net (all neurons active on x >= 0: L = ||W_l ... W_0||)."""
    rng = np.random.default_rng(seed)
    ws = [rng.uniform(0.0, 1.0, (b, a)) / a for a, b in pairwise(SIZES)]
    net = Network.from_arrays(ws, "relu")
    exact = np.linalg.norm(np.linalg.multi_dot(ws[::-1]), 2)
    t = sequential_multipliers(net)
    full = certify(net, t)
    along = certify(net, along_ray(net, t))  # what `sequential` proves: the multipliers scaled along their ray
    monkeypatch.setattr(reduced, "MIN_WIDTH", 1)
    assert reduced.plan(net) == (1, 4)
    cert = certify(net, t)
    assert cert is not None and cert.upper == pytest.approx(full.upper, rel=1e-9)
    assert exact <= cert.upper
    res = lipsdp.estimate(net, method="sequential", lower=True)
    assert any("neurons eliminated from the LMI (order 18)" in n for n in res.notes)
    assert res.lower <= exact * (1 + 1e-12) <= res.upper
    assert res.upper <= full.upper
    assert res.upper == pytest.approx(along.upper, rel=1e-6)
    # the scale found on F' (eliminated layers) is the one found on the full LMI
    assert certify(net, along_ray(net, t, (1, 4))).upper == pytest.approx(along.upper, rel=1e-6)


def test_plan_rules():
    """Only layers at least `min_width` wide and as wide as both neighbours, never two adjacent ones (the
    widest wins), never the last hidden layer, and only between layers whose slopes have a b = 0."""
    assert reduced.plan(he_network([4, 10, 9, 3, 2], 0), min_width=1) == (1,)  # 2 is adjacent to 1
    assert reduced.plan(he_network([4, 8, 10, 3, 2], 0), min_width=1) == (2,)
    assert reduced.plan(he_network([4, 10, 12, 2], 0), min_width=1) == ()  # 2 is the last hidden layer
    assert reduced.plan(he_network([4, 10, 3, 2], 0), min_width=11) == ()
    assert reduced.plan(he_network([4, 10, 3, 2], 0, ["relu", "leaky_relu:0.1"]), min_width=1) == ()
    assert reduced.plan(he_network([4, 10, 3, 2], 0, ["tanh", "sigmoid"]), min_width=1) == (1,)  # a = 0 both


def test_memory_estimate_counts_only_kept_blocks(monkeypatch):
    net = he_network([4, 10, 3, 2], 0)
    assert block_entries(net) == 16 + 100 + 9 + 40 + 30
    monkeypatch.setattr(reduced, "MIN_WIDTH", 1)
    assert block_entries(net) == 16 + 9 + 12
    assert block_entries(net, reduces=False) == 16 + 100 + 9 + 40 + 30  # the methods on the full LMI


def test_zero_multipliers_use_the_full_lmi(monkeypatch):
    """A zero multiplier on an eliminated layer (diag(t_j) singular) leaves the proof on the full LMI."""
    net = he_network(SIZES, 6, "relu")
    t = sequential_multipliers(net)
    t[net.sizes[1] - 1] = 0.0  # the last neuron of eliminated layer 1
    full = certify(net, t)
    monkeypatch.setattr(reduced, "MIN_WIDTH", 1)
    assert reduced.usable(net, (1, 4), t) == ()
    cert = certify(net, t)
    assert (cert is None) == (full is None)
    if cert is not None:
        assert cert.upper == full.upper


def test_sparse_weights_give_the_dense_proof(monkeypatch):
    """With every mostly-zero weight handled as CSR (threshold lowered), the balancing, the reduced forms
    and the proven bound are those of the dense weights (sums in another order: equal to rounding)."""
    rng = np.random.default_rng(7)
    sparse_ish = [w * (rng.uniform(size=w.shape) < 0.2) for w in he_network(SIZES, 7, "relu").weights]
    net = Network.from_arrays(sparse_ish, "relu")
    t = sequential_multipliers(net)
    monkeypatch.setattr(reduced, "MIN_WIDTH", 1)
    dense = certify(net, t)
    monkeypatch.setattr(weights, "SPARSE_MIN_ENTRIES", 0)
    sparse_net = sparse_weights(net)
    for w, w_s in zip(net.weights, sparse_net.weights):
        assert weights.is_sparse(w_s) == (np.count_nonzero(w) <= 0.25 * w.size)
    assert sum(weights.is_sparse(w) for w in sparse_net.weights) >= 3
    from lipsdp.lmi import Balancing

    bal_d, bal_s = Balancing.of(net), Balancing.of(sparse_net)
    assert bal_d.input_exp == bal_s.input_exp
    assert all(np.array_equal(a, b) for a, b in zip(bal_d.hidden_exps, bal_s.hidden_exps))
    for w_d, w_s in zip(bal_d.network(net).weights, bal_s.network(sparse_net).weights):
        assert np.array_equal(w_d, weights.dense(w_s))  # powers of two: exact either way
    f_d, s_d = reduced.Reduction(net, (1, 4)).forms(t)
    f_s, s_s = reduced.Reduction(sparse_net, (1, 4)).forms(t)
    assert np.allclose(f_d.dense(), f_s.dense(), rtol=0, atol=1e-13 * np.abs(f_d.dense()).max())
    assert np.allclose(s_d, s_s, rtol=1e-13)
    cert = certify(net, t)
    assert cert is not None and cert.upper == pytest.approx(dense.upper, rel=1e-12)


def test_term_count_covers_every_entry_of_a_sparse_net():
    """`Reduction.inner` (the rounding terms per entry) is at least the number of nonzero products in any
    entry of F', counted by brute force on the nonzero patterns, and below the dense widths."""
    rng = np.random.default_rng(8)
    ws = [w * (rng.uniform(size=w.shape) < 0.3) for w in he_network([6, 30, 5, 7, 40, 4, 3], 8).weights]
    net = Network.from_arrays(ws, "relu")
    gone = reduced.plan(net, min_width=1)
    assert gone == (1, 4)
    red = reduced.Reduction(net, gone)
    nz = [(w != 0).astype(int) for w in ws]
    worst = 0
    for p in red.kept:
        count = nz[p].T @ nz[p]  # its own product (W_l'W_l for the last block)
        if p + 1 in gone:
            count = count + nz[p].T @ nz[p]
        if p - 1 in gone:
            count = count + nz[p - 1] @ nz[p - 1].T
        worst = max(worst, int(count.max()) + 1)
    for j in gone:
        worst = max(worst, int((nz[j - 1].T @ nz[j].T).max()))
    assert worst <= red.inner - 8
    assert red.inner < 30 + 40


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eliminate", [True, False])
def test_gradient_of_rho_matches_central_differences(seed, eliminate):
    """`Reduction.rho_gradient` (envelope theorem, eliminated layers' part of the minimiser solved from their
    diagonal blocks) against central differences of rho*(T) on the full LMI (`lmi.schur_rho`), with layers
    eliminated and without."""
    net = he_network(SIZES, seed, MIXED)
    gone = reduced.plan(net, min_width=1) if eliminate else ()
    rng = np.random.default_rng(seed)
    t = sequential_multipliers(net) * np.exp(rng.uniform(0.0, 0.5, net.n_neurons))
    rho, grad, top = reduced.Reduction(net, gone).rho_gradient(t)
    assert rho == pytest.approx(schur_rho(net, t), rel=1e-10)
    assert top.shape == (net.sizes[0],) and np.linalg.norm(top) == pytest.approx(1.0)
    for i in range(net.n_neurons):
        step = np.zeros(net.n_neurons)
        step[i] = 1e-6 * t[i]
        numeric = (schur_rho(net, t + step) - schur_rho(net, t - step)) / (2e-6 * t[i])
        assert grad[i] == pytest.approx(numeric, rel=1e-5, abs=1e-7 * np.max(np.abs(grad)))


def test_rho_gradient_is_none_outside_the_domain():
    """Multipliers too small for the last layer leave the hidden blocks indefinite: no bound, no gradient."""
    net = he_network(SIZES, 0, "relu")
    t = 1e-6 * sequential_multipliers(net)
    assert schur_rho(net, t) is None
    assert reduced.Reduction(net, reduced.plan(net, min_width=1)).rho_gradient(t) is None
