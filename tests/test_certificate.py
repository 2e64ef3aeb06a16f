"""The verifier: it must accept feasible (rho, T), reject infeasible ones, and repair inexact solver output."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from conftest import he_network

import lipsdp
from lipsdp import Network
from lipsdp.certificate import (
    certified_product,
    certify,
    certify_or_repair,
    factor_norm_bound,
    lmi_forms,
    prove_positive_definite,
)
from lipsdp.lmi import negated_lmi, schur_rho, sequential_multipliers
from lipsdp.lower import jacobian_norms, lower_bound


def dense_m(net: Network, rho: float, t: np.ndarray) -> np.ndarray:
    """M(rho, T) written out block by block from the formulas in DESIGN.md (independent of lipsdp.lmi)."""
    sizes = net.sizes[:-1]
    offs = np.concatenate([[0], np.cumsum(sizes)])
    m = np.zeros((offs[-1], offs[-1]))
    ts = np.split(np.asarray(t, dtype=float), np.cumsum(net.hidden_sizes)[:-1])
    l = net.depth
    for k in range(l + 1):
        sl = slice(offs[k], offs[k + 1])
        w = net.weights[k]
        if k == 0:
            m[sl, sl] -= rho * np.eye(sizes[0])
        else:
            m[sl, sl] -= 2.0 * np.diag(ts[k - 1])
        if k < l:
            a, b, tk = net.alphas[k], net.betas[k], np.diag(ts[k])
            m[sl, sl] -= 2.0 * w.T @ (np.diag(a * b) @ tk) @ w
            nxt = slice(offs[k + 1], offs[k + 2])
            m[sl, nxt] += w.T @ np.diag(a + b) @ tk
            m[nxt, sl] += (w.T @ np.diag(a + b) @ tk).T
        else:
            m[sl, sl] += w.T @ w
    return m


@pytest.fixture(scope="module")
def small_net():
    return he_network([3, 6, 5, 2], 11, ["relu", "tanh"])


@pytest.fixture(scope="module")
def small_opt(small_net):
    """The Neuron optimum of small_net: (verified result, its multipliers)."""
    res = lipsdp.estimate(small_net, "neuron")
    return res, res.multipliers


def test_lmi_matches_the_paper_formula(small_net):
    t = np.random.default_rng(0).uniform(0.1, 2.0, small_net.n_neurons)
    np.testing.assert_allclose(
        negated_lmi(small_net, 3.7, t).dense(), -dense_m(small_net, 3.7, t), atol=1e-12
    )


def test_schur_rho_is_the_smallest_feasible_rho(small_net, small_opt):
    _, t = small_opt
    rho = schur_rho(small_net, t)
    assert rho is not None and rho > 0
    # Independently: -M is PSD just above rho and indefinite just below (dense eigenvalues).
    assert np.linalg.eigvalsh(-dense_m(small_net, rho * (1 + 1e-6), t))[0] > 0
    assert np.linalg.eigvalsh(-dense_m(small_net, rho * (1 - 1e-6), t))[0] < 0


@pytest.mark.parametrize("sizes", [[3, 6, 5, 2], [4, 7, 2, 9, 3], [5, 1, 8, 1]])
def test_block_cholesky_solves_and_inverts_like_dense(sizes):
    """The block-bidiagonal factor of F(rho, T) (what the interior-point method applies Z^-1 with) gives
    the same solves, inverse, products and inner products as dense numpy on the paper's dense matrix."""
    net = he_network(sizes, sum(sizes), ["relu", "tanh", "sigmoid"][: len(sizes) - 2])
    # per-neuron multipliers near the layer-by-layer ones (strictly feasible for some rho)
    t = sequential_multipliers(net) * np.random.default_rng(len(sizes)).uniform(1.0, 1.1, net.n_neurons)
    assert schur_rho(net, t) is not None
    rho = 2.0 * schur_rho(net, t) + 1.0
    f = negated_lmi(net, rho, t)
    dense = -dense_m(net, rho, t)
    chol = f.cholesky()
    assert chol is not None
    rng = np.random.default_rng(0)
    b = rng.standard_normal((dense.shape[0], 3))
    scale = np.linalg.norm(np.linalg.inv(dense), 2)
    assert np.allclose(chol.solve(b), np.linalg.solve(dense, b), atol=1e-12 * scale * np.abs(b).max())
    assert np.allclose(chol.inverse(), np.linalg.inv(dense), atol=1e-12 * scale)
    assert np.allclose(f.matvec(b), dense @ b, atol=1e-12 * np.abs(dense).max())
    sym = b @ b.T
    assert f.inner(sym) == pytest.approx(float(np.sum(dense * sym)), rel=1e-12)
    # below rho*(T) the matrix is indefinite: the factorisation must refuse
    assert negated_lmi(net, 0.5 * schur_rho(net, t), t).cholesky() is None


def test_feasible_certificate_is_accepted_and_sound(small_net, small_opt):
    res, t = small_opt
    cert = certify(small_net, t)
    assert cert is not None
    assert cert.upper == pytest.approx(res.upper, rel=1e-9)
    assert cert.upper**2 >= cert.rho
    assert np.linalg.eigvalsh(-dense_m(small_net, cert.rho, cert.multipliers))[0] > 0
    # the proof runs on the equilibrated LMI; a little more room proves the unscaled one too
    assert prove_positive_definite(small_net, cert.rho * (1 + 1e-6), cert.multipliers) > 0
    lower = lower_bound(small_net, seed=0).value
    assert lower <= cert.upper


def test_rho_far_below_truth_is_rejected(small_net, small_opt):
    _, t = small_opt
    lower = lower_bound(small_net, seed=0).value
    # No T can make rho < L^2 feasible; in particular not the optimal one.
    assert prove_positive_definite(small_net, 0.25 * lower**2, t) is None
    assert prove_positive_definite(small_net, 0.99 * lower**2, t) is None


def test_rho_just_below_the_optimum_is_rejected(small_net, small_opt):
    _, t = small_opt
    rho = schur_rho(small_net, t)
    assert prove_positive_definite(small_net, rho * (1 - 1e-7), t) is None
    assert prove_positive_definite(small_net, rho * (1 + 1e-6), t) is not None


def test_zero_multipliers_are_rejected(small_net):
    zeros = np.zeros(small_net.n_neurons)
    assert certify(small_net, zeros) is None
    assert prove_positive_definite(small_net, 1e6, zeros) is None


def test_wrong_multiplier_count_is_rejected(small_net, small_opt):
    _, t = small_opt
    assert certify(small_net, t[:-1]) is None
    assert certify(small_net, np.full(small_net.n_neurons, np.nan)) is None


def test_exactly_singular_lmi_is_rejected():
    w = np.array([[3.0, 0.0], [0.0, 1.0]])
    net = Network.from_arrays([w], [])
    assert prove_positive_definite(net, 9.0, np.zeros(0)) is None  # rho I - W'W singular
    assert prove_positive_definite(net, 9.0 * (1 + 1e-9), np.zeros(0)) is not None
    assert certify(net, None).upper >= 3.0


@pytest.mark.parametrize("seed", range(8))
def test_random_multipliers_give_sound_bounds(seed):
    """Whatever T the verifier accepts, the bound it proves lies above every Jacobian norm we can find.
    T: the layer-by-layer multipliers scaled neuron by neuron by random factors in [0.6, 7.4]."""
    rng = np.random.default_rng(seed)
    net = he_network([3, 7, 7, 2], seed, bias_scale=0.5)
    t = sequential_multipliers(net) * np.exp(rng.uniform(-0.5, 2.0, net.n_neurons))
    cert = certify(net, t)
    if cert is None:  # then T must really be infeasible: an indefinite hidden block
        assert np.linalg.eigvalsh(-dense_m(net, 1e12, t)[3:, 3:])[0] < 0
        return
    assert np.linalg.eigvalsh(-dense_m(net, cert.rho, cert.multipliers))[0] > 0
    xs = rng.standard_normal((2000, 3)) * 3.0
    assert jacobian_norms(net, xs).max() <= cert.upper


@pytest.mark.parametrize("seed", range(4))
def test_factor_norm_bound_covers_the_norm_of_the_absolute_factor(seed):
    """The Cholesky rounding margin rests on an upper bound of || |L| ||_2^2: checked on the dense
    absolute factor, whose 2-norm numpy computes independently; Collatz-Wielandt's bound is within 5% of
    it and below Hoelder's ||L||_1 ||L||_inf."""
    net = he_network([5, 9, 4, 6, 3], seed, bias_scale=0.5)
    t = sequential_multipliers(net)
    f = negated_lmi(net, 1.5 * schur_rho(net, t), t)
    chol = f.cholesky()
    sizes = [d.shape[0] for d in f.diag]
    offs = np.concatenate([[0], np.cumsum(sizes)])
    low = np.zeros((offs[-1], offs[-1]))
    for k, d in enumerate(chol.lowers):
        low[offs[k] : offs[k + 1], offs[k] : offs[k + 1]] = d
        if k:
            low[offs[k] : offs[k + 1], offs[k - 1] : offs[k]] = chol.subs[k - 1]
    assert np.allclose(low @ low.T, f.dense(), atol=1e-10)
    bound = factor_norm_bound(chol)
    exact = np.linalg.norm(np.abs(low), 2) ** 2
    hoelder = np.abs(low).sum(axis=0).max() * np.abs(low).sum(axis=1).max()
    assert exact <= bound <= 1.05 * exact
    assert bound <= hoelder * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_proven_eigenvalue_bound_is_below_the_true_smallest_eigenvalue(seed):
    """What prove_positive_definite returns is a lower bound on lambda_min(F): compare with the dense F of
    the formulas in DESIGN.md, at rho just above rho*(T) and far above it."""
    net = he_network([4, 8, 8, 3], seed, bias_scale=0.5)
    t = sequential_multipliers(net)
    rho_star = schur_rho(net, t)
    forms = lmi_forms(net, t)
    for rho in (rho_star * (1 + 1e-6), rho_star * 2.0):
        proven = prove_positive_definite(net, rho, t, forms)
        assert proven is not None
        assert 0 < proven <= np.linalg.eigvalsh(-dense_m(net, rho, t))[0]


def test_repair_of_zero_multipliers_falls_back_to_sequential(small_net):
    cert, note = certify_or_repair(small_net, np.zeros(small_net.n_neurons))
    assert "layer-by-layer" in note
    assert cert.upper == pytest.approx(lipsdp.estimate(small_net, "sequential").upper, rel=1e-9)


def test_repair_of_perturbed_optimum(small_net, small_opt):
    """Optimal multipliers with the last layer shrunk (so that 2T - W'W is indefinite) are infeasible;
    the repair must still produce a verified bound close to the optimum."""
    res, t = small_opt
    bad = t.copy()
    bad[-net_last(small_net) :] *= 0.3
    assert certify(small_net, bad) is None
    cert, note = certify_or_repair(small_net, bad)
    assert note
    assert cert.upper >= res.upper * (1 - 1e-9)
    assert cert.upper <= lipsdp.estimate(small_net, "sequential").upper * (1 + 1e-9)


def net_last(net: Network) -> int:
    return net.hidden_sizes[-1]


def test_scs_answer_below_optimum_is_repaired(original_net, original_neuron):
    """SCS at default settings returns sqrt(rho) = 36.228 on the original net, below the true optimum
    36.482: not a valid bound. The verified result must be >= the optimum and within a few percent.
    (The method is called directly, on the net exactly as published, so SCS sees the original problem.)"""
    from lipsdp.methods import get_method

    out = get_method("neuron")(original_net, solver="scs")
    assert out.solver == "scs"
    assert out.raw < original_neuron.raw * (1 - 1e-3)  # the solver's own number is invalid ...
    assert out.upper >= original_neuron.raw  # ... the verified one is not
    assert out.upper >= original_neuron.upper * (1 - 1e-7)
    assert out.upper <= original_neuron.upper * 1.03
    assert certify(original_net, out.multipliers).upper == pytest.approx(out.upper, rel=1e-9)


def test_certified_product_rounds_up():
    factors = [0.1, 3.3, 7.0 / 3.0, 1e-3, 12.9]
    exact = Fraction(1)
    for f in factors:
        exact *= Fraction(f)
    assert Fraction(certified_product(factors)) >= exact
    assert certified_product(factors) == pytest.approx(float(exact), rel=1e-14)
    assert certified_product([2.0, 0.0]) == 0.0


@pytest.mark.parametrize("kind", ["zero", "one entry", "negative", "random"])
def test_top_eigenvalue_by_lanczos_matches_lapack(kind):
    """From order LANCZOS_MIN on the top eigenvalue comes from ARPACK; it agrees with LAPACK to 1e-10
    (relative to the norm), and the cases ARPACK cannot start on (a zero matrix) fall back to LAPACK."""
    import scipy.linalg as sla

    from lipsdp.lmi import LANCZOS_MIN, top_eigenvalue

    n = LANCZOS_MIN + 10
    a = np.random.default_rng(0).standard_normal((n, 40))
    m = {
        "zero": np.zeros((n, n)),
        "one entry": np.diag(np.r_[np.zeros(n - 1), 3.0]),
        "negative": -np.eye(n) - 0.5 * np.diag(np.arange(n) / n),
        "random": a @ a.T,
    }[kind]
    exact = float(sla.eigvalsh(m, subset_by_index=[n - 1, n - 1])[0])
    assert top_eigenvalue(m) == pytest.approx(exact, abs=1e-10 * max(1.0, np.abs(m).max()))


@pytest.mark.parametrize("large", [False, True])
def test_schedule_of_inflations_and_recipes(monkeypatch, large):
    """Every attempt failing (a stub in place of the proof step), certify tries the given T alone at the
    smallest inflation, then each recipe per inflation; on a large LMI the given T at every inflation up to
    LARGE_FIRST_INFLATION first. Each attempt is a whole proof, so the order changes cost, never soundness."""
    import lipsdp.certificate as cert_mod

    net = he_network([4, 6, 5, 2], 3)
    t = sequential_multipliers(net)
    tried = []

    def failing(net, bal, net_b, t_b, rho_star, inflation, forms=None):
        tried.append((inflation, id(forms)))  # and no certificate

    monkeypatch.setattr(cert_mod, "_prove_at", failing)
    if large:
        monkeypatch.setattr(cert_mod, "LARGE_LMI_ORDER", 1)
    assert cert_mod.certify(net, t) is None
    inflations = cert_mod.RHO_INFLATIONS[2:] if large else cert_mod.RHO_INFLATIONS
    assert len(tried) == 1 + 4 * (len(inflations) - 1)
    first = sum(1 for x in inflations if x <= cert_mod.LARGE_FIRST_INFLATION) if large else 1
    assert [x for x, _ in tried[:first]] == list(inflations[:first])
    assert len({f for _, f in tried[:first]}) == 1  # one recipe: the given T, equilibrated
    assert tried[first][0] == inflations[1]  # then the usual order from the second inflation on
    assert sorted(x for x, _ in tried) == sorted([inflations[0]] + [x for x in inflations[1:] for _ in range(4)])
