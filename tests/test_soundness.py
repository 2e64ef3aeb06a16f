"""Soundness at scale: property-based checks over random small networks.

Every method's verified upper bound must lie above a true lower bound (largest Jacobian norm found by
`lipsdp.lower`), above the exact constant where enumeration gives it (1-D input piecewise-linear nets),
and the orderings between methods must hold: neuron <= layer <= naive, sequential <= naive,
neuron <= sequential (all within 1e-6 relative). A method may refuse with a `LipSDPError` (a clear error
is allowed); it may never return NaN, a negative number, or another exception.

Profiles (deterministic by default, so CI is reproducible):
    pytest tests/test_soundness.py                          # default: derandomized, ~1-2 minutes
    HYPOTHESIS_PROFILE=long pytest tests/test_soundness.py  # 20x more examples, fresh random cases,
                                                            # and the 10,000-case campaign (test_campaign)
A failing case is printed with its concrete weights (`print_blob`); copy it into test_regressions.py.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from conftest import exact_lipschitz_1d
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

import lipsdp
from lipsdp import LipSDPError, Network
from lipsdp.lower import lower_bound

LONG = os.environ.get("HYPOTHESIS_PROFILE", "default") == "long"
METHODS = ("naive", "sequential", "layer", "neuron")
REL = 1e-6
ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu:0.1", "leaky_relu:0.5", "elu", "softplus", "identity", "abs")
PIECEWISE_LINEAR = ("relu", "leaky_relu:0.1", "leaky_relu:0.5", "identity", "abs")
STRUCTURES = ("dense", "sparse", "duplicated", "rank1", "zero_row")


def budget(examples: int):
    """Hypothesis settings: `examples` by default (derandomized), 20x and random under the long profile."""
    return settings(
        max_examples=examples * 20 if LONG else examples,
        deadline=None,
        derandomize=not LONG,
        print_blob=True,
        database=None if not LONG else settings.default.database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def make_weights(sizes: list[int], scales: list[float], structure: str, seed: int) -> list[np.ndarray]:
    """Seeded weights with a given per-layer scale and a structure that provokes degenerate LMIs."""
    rng = np.random.default_rng(seed)
    weights = []
    for (n_in, n_out), scale in zip(itertools.pairwise(sizes), scales):
        w = rng.standard_normal((n_out, n_in))
        if structure == "sparse":
            w *= rng.random(w.shape) < 0.4
        elif structure == "duplicated" and n_out > 1:
            w[n_out // 2 :] = w[: n_out - n_out // 2]
        elif structure == "rank1":
            w = np.outer(rng.standard_normal(n_out), rng.standard_normal(n_in))
        elif structure == "zero_row":
            w[rng.integers(n_out)] = 0.0
        weights.append(w * scale)
    return weights


@st.composite
def networks(draw, activations=ACTIVATIONS, input_dim=None, scale_range=(-4.0, 4.0)) -> Network:
    hidden = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 8)) for _ in range(hidden + 2)]
    if input_dim is not None:
        widths[0] = input_dim
    lo, hi = scale_range
    scales = [10.0 ** draw(st.floats(lo, hi)) for _ in range(hidden + 1)]
    acts = draw(st.lists(st.sampled_from(activations), min_size=hidden, max_size=hidden))
    structure = draw(st.sampled_from(STRUCTURES))
    seed = draw(st.integers(0, 2**32 - 1))
    weights = make_weights(widths, scales, structure, seed)
    biases = [np.random.default_rng(seed + 1).normal(0.0, 1.0, w.shape[0]) for w in weights]
    note(f"sizes={widths} acts={acts} structure={structure} seed={seed} scales={scales}")
    note(f"weights={[w.tolist() for w in weights]}")
    return Network.from_arrays(weights, acts, biases)


def verified_bounds(net: Network) -> dict[str, float]:
    """Each method's verified bound; a clear LipSDPError is allowed (recorded as None)."""
    out = {}
    for m in METHODS:
        try:
            res = lipsdp.estimate(net, m)
        except LipSDPError as exc:
            note(f"{m} refused: {exc}")
            out[m] = None
            continue
        assert res.verified
        assert np.isfinite(res.upper) and res.upper >= 0.0, (m, res.upper)
        out[m] = res.upper
    note(f"bounds={out}")
    return out


def check_orderings(b: dict[str, float | None]) -> None:
    slack = 1.0 + REL
    for small, large in (
        ("neuron", "layer"),
        ("layer", "naive"),
        ("sequential", "naive"),
        ("neuron", "sequential"),
    ):
        if b[small] is not None and b[large] is not None:
            assert b[small] <= b[large] * slack, f"{small} {b[small]!r} > {large} {b[large]!r}"


@budget(45)
@given(net=networks())
def test_bounds_above_lower_bound_and_ordered(net):
    b = verified_bounds(net)
    # The naive product of verified spectral norms needs no solver: it must always succeed in range.
    assert b["naive"] is not None
    lower = lower_bound(net, samples=16, steps=6, seed=0).value
    note(f"lower={lower!r}")
    assert np.isfinite(lower) and lower >= 0.0
    for m, upper in b.items():
        if upper is not None:
            assert lower <= upper * (1.0 + 1e-9), f"{m}: lower {lower!r} > verified upper {upper!r}"
    check_orderings(b)


@budget(20)
@given(net=networks(activations=PIECEWISE_LINEAR, input_dim=1, scale_range=(-2.0, 2.0)))
def test_bounds_above_exact_constant_1d(net):
    """1-D input piecewise-linear nets: the exact constant from the breakpoints (conftest) is a floor."""
    exact = exact_lipschitz_1d(net)
    note(f"exact={exact!r}")
    b = verified_bounds(net)
    assert b["naive"] is not None
    for m, upper in b.items():
        if upper is not None:
            assert upper >= exact * (1.0 - 1e-12), f"{m}: verified {upper!r} < exact {exact!r}"
    check_orderings(b)


@budget(15)
@given(net=networks(activations=("relu", "leaky_relu:0.1", "identity")), log2_scale=st.integers(-40, 40))
def test_homogeneity_under_power_of_two_scaling(net, log2_scale):
    """For positively homogeneous activations, scaling W_0 by 2^k scales L by exactly 2^k; every verified
    bound of the scaled net, scaled back, must still cover the lower bound of the original net."""
    assume(all(a.name in ("relu", "leaky_relu", "identity") for a in net.activations))
    scaled = Network.from_arrays(
        [np.ldexp(net.weights[0], log2_scale)] + list(net.weights[1:]),
        list(net.activations),
        list(net.biases),
    )
    lower = lower_bound(net, samples=16, steps=6, seed=0).value
    for m in ("naive", "sequential", "neuron"):
        upper = lipsdp.estimate(scaled, m).upper
        assert lower <= np.ldexp(upper, -log2_scale) * (1.0 + 1e-9), m


@pytest.mark.parametrize("method", METHODS)
def test_repeatable(method):
    """Same inputs and seed give the same numbers, bit for bit."""
    net = Network.from_arrays(make_weights([3, 6, 5, 2], [1.0, 0.5, 2.0], "dense", 11), ["relu", "tanh"])
    a = lipsdp.estimate(net, method, lower=True, seed=3, lower_samples=32, lower_steps=5)
    b = lipsdp.estimate(net, method, lower=True, seed=3, lower_samples=32, lower_steps=5)
    assert (a.upper, a.lower, a.raw) == (b.upper, b.lower, b.raw)
    np.testing.assert_array_equal(a.lower_point, b.lower_point)


# -- the soundness campaign: many random cases, extreme scales, certificates re-checked ---------------
# One case = one network and one method. Cheap methods take most cases; neuron and anytime a tenth each.
CAMPAIGN_METHODS = ("naive", "naive", "sequential", "sequential", "sequential", "layer", "layer", "layer",
                    "neuron", "anytime")
CAMPAIGN_DEFAULT, CAMPAIGN_LONG = 30, int(os.environ.get("LIPSDP_CAMPAIGN_CASES", "10000"))
EXACT_ACTIVATIONS = ("relu", "leaky_relu:0.1", "tanh", "identity")  # slopes in [0, 1], slope 1 at 0


def campaign_budget():
    """CAMPAIGN_DEFAULT cases by default (derandomized); CAMPAIGN_LONG fresh random ones under the long profile."""
    return settings(
        max_examples=CAMPAIGN_LONG if LONG else CAMPAIGN_DEFAULT,
        deadline=None,
        derandomize=not LONG,
        print_blob=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@st.composite
def campaign_networks(draw) -> tuple[Network, float | None]:
    """A random net whose layer scales span 1e-280..1e280 with every partial product of scales, and the
    constant's scale, within 1e-140..1e140 (so Jacobians stay in float range). With 'nonneg' structure
    (nonnegative weights, zero biases, activations with slopes in [0, 1] and slope 1 at 0) the exact
    constant is known: L = ||W_l ... W_0||_2 (attained at x = 0 / on the all-active region; no other
    Jacobian diag-product is larger, the norm being monotone on nonnegative matrices); it is returned."""
    hidden = draw(st.integers(0, 4))
    widths = [draw(st.integers(1, 8)) for _ in range(hidden + 2)]
    prefix = [0.0] + [draw(st.floats(-140.0, 140.0)) for _ in range(hidden + 1)]
    exps = [b - a for a, b in itertools.pairwise(prefix)]
    seed = draw(st.integers(0, 2**32 - 1))
    nonneg = draw(st.integers(0, 5)) == 0
    if nonneg:
        acts = draw(st.lists(st.sampled_from(EXACT_ACTIVATIONS), min_size=hidden, max_size=hidden))
        rng = np.random.default_rng(seed)
        weights = [rng.random((b, a)) * 10.0**e for (a, b), e in zip(itertools.pairwise(widths), exps)]
        net = Network.from_arrays(weights, acts)
        # ||prod W_k|| with each factor normalised by an exact power of two (no overflow on the way)
        shifts = [int(np.frexp(np.max(w))[1]) for w in weights]
        prod = np.eye(widths[0])
        for w, s in zip(weights, shifts):
            prod = np.ldexp(w, -s) @ prod
        exact = float(np.ldexp(np.linalg.norm(prod, 2), sum(shifts)))
        note(f"nonneg sizes={widths} acts={acts} seed={seed} exps={exps} exact={exact!r}")
        return net, exact
    acts = draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=hidden, max_size=hidden))
    structure = draw(st.sampled_from(STRUCTURES))
    weights = make_weights(widths, [10.0**e for e in exps], structure, seed)
    biases = [np.random.default_rng(seed + 1).normal(0.0, 1.0, w.shape[0]) for w in weights]
    note(f"sizes={widths} acts={acts} structure={structure} seed={seed} exps={exps}")
    return Network.from_arrays(weights, acts, biases), None


@campaign_budget()
@given(case=campaign_networks(), method=st.sampled_from(CAMPAIGN_METHODS), recheck=st.integers(0, 9))
def test_campaign(case, method, recheck, tmp_path_factory):
    """Verified upper >= the largest sampled Jacobian norm, >= the exact constant where known; and one
    case in ten re-proves its certificate with the independent checker (`lipsdp.verify`)."""
    from hypothesis import event

    net, exact = case
    options = {"budget": 5.0, "steps": 20} if method == "anytime" else {}
    event(f"method {method}")
    try:
        res = lipsdp.estimate(net, method, **options)
    except LipSDPError as exc:
        note(f"{method} refused: {exc}")
        event("refused with a clear error")
        return
    assert res.verified and np.isfinite(res.upper) and res.upper >= 0.0, res.upper
    lower = lower_bound(net, samples=16, steps=6, seed=0).value
    note(f"upper={res.upper!r} lower={lower!r}")
    assert np.isfinite(lower) and lower >= 0.0
    assert lower <= res.upper * (1.0 + 1e-9), f"{method}: lower {lower!r} > verified upper {res.upper!r}"
    if exact is not None:
        event("exact constant known")
        assert res.upper >= exact * (1.0 - 1e-10), f"{method}: verified {res.upper!r} < exact {exact!r}"
    if recheck == 0:
        path = tmp_path_factory.mktemp("cert")
        model = path / "net.npz"
        arrays = {f"W{k}": w for k, w in enumerate(net.weights)}
        arrays.update({f"b{k}": b for k, b in enumerate(net.biases)})
        if net.activations:
            arrays["activations"] = np.array(
                [a.name if a.param is None else f"{a.name}:{a.param!r}" for a in net.activations]
            )
        np.savez(model, **arrays)
        cert = res.save_certificate(path / "cert.json")
        verdict = lipsdp.verify(cert, model)
        assert verdict.accepted, verdict.reason
        event("certificate re-proved")
        if exact is not None and exact > 0 and res.proof.kind == "lmi":
            # rho below the exact L^2 (in the proof's scaled coordinates) cannot be proved: the checker
            # must reject it, whatever the multipliers
            data = json.loads(cert.read_text())
            e = sum(sum(s["exponents"]) for s in data["proof"]["steps"] if s["op"] == "scale")
            data["proof"]["rho"] = float(np.ldexp(exact * exact * (1 - 1e-6), 2 * e)).hex()
            data["claim"]["upper"] = (exact * (1 - 1e-7)).hex()
            cert.write_text(json.dumps(data))
            verdict = lipsdp.verify(cert, model)
            assert not verdict.accepted, f"checker accepted rho below L^2: {verdict.reason}"
            event("tampered certificate rejected")
