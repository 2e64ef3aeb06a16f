"""One wide hidden layer eliminated from the LMI: the reduced problem against the full LMI, LipSDP-Layer and
LipSDP-Neuron (interior point), exact constants, and `lipsdp verify`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import he_network
from test_certificate import dense_m
from test_verify import certify_file, save_npz

import lipsdp
from lipsdp import Network, eliminate
from lipsdp.certificate import certify
from lipsdp.lmi import schur_rho
from lipsdp.lower import lower_bound
from lipsdp.verify import verify

ACTIVATIONS = ["relu", "leaky_relu:0.1", "tanh", "sigmoid"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reduced_rho_is_the_full_lmi_rho(activation):
    """rho*(T) from the Schur complement on the hidden layer (Lanczos on the operator, and from the formed
    blocks) equals rho*(T) of the full LMI's block recursion, for per-neuron T."""
    net = he_network([4, 40, 3], 1, activation, bias_scale=0.5)
    red = eliminate.Reduced(net)
    t = eliminate.layer_multipliers(net) * np.exp(np.random.default_rng(0).uniform(0.0, 1.0, 40))
    full = schur_rho(net, t)
    assert red.rho(t)[0] == pytest.approx(full, rel=1e-9)
    assert eliminate.rho_from_forms(red.forms(t, 1.0)) == pytest.approx(full, rel=1e-9)


def test_gradient_matches_finite_differences():
    net = he_network([3, 25, 2], 2, "leaky_relu:0.2")
    red = eliminate.Reduced(net)
    t = eliminate.layer_multipliers(net) * np.exp(np.random.default_rng(1).uniform(0.0, 0.5, 25))
    _, v = red.rho(t)
    grad = red.gradient(t, v)
    for i in (0, 7, 24):
        step = 1e-6 * t[i]
        up, down = t.copy(), t.copy()
        up[i] += step
        down[i] -= step
        assert grad[i] == pytest.approx((red.rho(up)[0] - red.rho(down)[0]) / (2 * step), rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_single_multiplier_is_lipsdp_layer(seed):
    """For one hidden layer the best T = tau I is LipSDP-Layer's optimum (interior point on the full LMI)."""
    net = he_network([4, 30, 3], seed, bias_scale=0.5)
    cert = eliminate.certify(net, eliminate.layer_multipliers(net))
    assert cert.upper == pytest.approx(lipsdp.estimate(net, "layer").upper, rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_per_neuron_multipliers_approach_lipsdp_neuron(seed):
    """L-BFGS per neuron: between LipSDP-Neuron's proven optimum and LipSDP-Layer, within 1% of the former."""
    net = he_network([4, 30, 3], seed, bias_scale=0.5)
    layer = eliminate.layer_multipliers(net)
    t, evaluations = eliminate.neuron_multipliers(net, layer, deadline=float("inf"))
    assert evaluations > 0
    cert = eliminate.certify(net, t)
    neuron = lipsdp.estimate(net, "neuron")
    assert neuron.sdp_lower <= cert.upper <= eliminate.certify(net, layer).upper
    assert cert.upper <= neuron.upper * 1.01


@pytest.mark.parametrize("seed", range(4))
def test_certificate_proves_the_full_lmi(seed):
    """What the reduced proof certifies, the full LMI holds (dense eigenvalues), and the bound is the full
    path's certificate for the same T, above every Jacobian norm found."""
    net = he_network([5, 40, 2], seed, bias_scale=0.5)
    t, _ = eliminate.neuron_multipliers(net, eliminate.layer_multipliers(net), deadline=float("inf"))
    cert = eliminate.certify(net, t)
    assert np.linalg.eigvalsh(-dense_m(net, cert.rho, cert.multipliers))[0] > 0
    assert cert.upper == pytest.approx(certify(net, t).upper, rel=1e-8)
    assert lower_bound(net, seed=0).value <= cert.upper


def test_exact_constant_of_nonnegative_relu_net():
    """Nonnegative weights, zero biases: L = ||W1 W0|| exactly (all neurons active on x >= 0)."""
    rng = np.random.default_rng(3)
    w0, w1 = rng.random((48, 4)), rng.random((3, 48))
    net = Network.from_arrays([w0, w1], "relu")
    exact = float(np.linalg.norm(w1 @ w0, 2))
    t, _ = eliminate.neuron_multipliers(net, eliminate.layer_multipliers(net), deadline=float("inf"))
    cert = eliminate.certify(net, t)
    assert exact <= cert.upper <= exact * 1.05


def test_infeasible_or_zero_multipliers_are_refused():
    net = he_network([3, 20, 2], 0)
    assert eliminate.certify(net, np.zeros(20)) is None
    assert eliminate.certify(net, np.full(20, 1e-9)) is None  # R = I - W1 T^-1 W1' / 2 indefinite
    assert eliminate.Reduced(net).rho(np.full(20, 1e-9)) is None
    assert eliminate.certify(net, np.full(19, 1.0)) is None


def test_methods_use_elimination_on_wide_layers(monkeypatch):
    """With the width threshold lowered, sequential and anytime take the eliminated route: sequential is
    LipSDP-Layer, anytime at least as tight; both above the Jacobian lower bound."""
    monkeypatch.setattr(eliminate, "MIN_WIDTH", 40)
    net = he_network([3, 48, 2], 4, bias_scale=0.5)
    assert eliminate.applies(net)
    seq = lipsdp.estimate(net, "sequential")
    anytime = lipsdp.estimate(net, "anytime", budget=2.0)
    assert any("eliminated" in n for n in seq.notes) and any("eliminated" in n for n in anytime.notes)
    assert seq.upper == pytest.approx(lipsdp.estimate(net, "layer").upper, rel=1e-6)
    assert lower_bound(net, seed=0).value <= anytime.upper <= seq.upper * (1 + 1e-12)


@pytest.mark.parametrize("method", ["sequential", "anytime"])
def test_verify_accepts_eliminated_certificates_and_rejects_a_lower_rho(tmp_path, monkeypatch, method):
    """`lipsdp verify` proves the same LMI through the same elimination, in ball arithmetic; a rho below
    the exact L^2 of a nonnegative net cannot be proved."""
    import json

    monkeypatch.setattr(eliminate, "MIN_WIDTH", 40)
    rng = np.random.default_rng(5)
    net = Network.from_arrays([rng.random((48, 4)), rng.random((3, 48))], "relu")
    exact = float(np.linalg.norm(net.weights[1] @ net.weights[0], 2))
    model = save_npz(tmp_path / "net.npz", net)
    res, cert = certify_file(tmp_path, model, method, **({"budget": 2.0} if method == "anytime" else {}))
    v = verify(cert, model)
    assert v.accepted, v.reason
    assert exact <= v.proven <= res.upper
    data = json.loads(cert.read_text())
    scale = sum(sum(s["exponents"]) for s in data["proof"]["steps"] if s["op"] == "scale")
    data["proof"]["rho"] = (exact**2 * 4.0**scale * (1 - 1e-9)).hex()
    data["claim"]["upper"] = (exact * (1 - 1e-10)).hex()
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data), encoding="utf-8")
    v = verify(tampered, model)
    assert not v.accepted and "positive definite" in v.reason


def test_layer_and_neuron_on_a_wide_layer(monkeypatch):
    """`layer` gives its exact optimum through the reduced LMI; `neuron` (dense interior point) refuses
    with a clear error naming the alternatives."""
    monkeypatch.setattr(eliminate, "MIN_WIDTH", 40)
    net = he_network([3, 48, 2], 6, bias_scale=0.5)
    layer = lipsdp.estimate(net, "layer")
    monkeypatch.setattr(eliminate, "MIN_WIDTH", 10**9)
    assert layer.upper == pytest.approx(lipsdp.estimate(net, "layer").upper, rel=1e-6)
    monkeypatch.setattr(eliminate, "MIN_WIDTH", 40)
    with pytest.raises(lipsdp.LipSDPError, match="anytime"):
        lipsdp.estimate(net, "neuron")
