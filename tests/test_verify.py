"""Certificates as files, re-checked independently (`lipsdp.verify`, arb ball arithmetic).

The truths used here do not come from lipsdp's own certifier: exact constants of hand-built nets
(W = diag(3, 1): L = 3, rho* = 9 exactly; nonnegative ReLU nets: L = ||W_1 W_0||_2), the definition of
the hash, and the structure of the JSON file.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import he_network
from typer.testing import CliRunner

import lipsdp
from lipsdp import LipSDPError, Network
from lipsdp.cli import app
from lipsdp.proof import Proof, Step, certificate_json, network_record
from lipsdp.verify import verify

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
REALNETS = ROOT.parent / "shared" / "realnets" / "fc"


def save_npz(path: Path, net: Network) -> Path:
    arrays = {f"W{k}": w for k, w in enumerate(net.weights)}
    arrays.update({f"b{k}": b for k, b in enumerate(net.biases)})
    if net.activations:
        labels = [a.name if a.param is None else f"{a.name}:{a.param!r}" for a in net.activations]
        arrays["activations"] = np.array(labels)
    np.savez(path, **arrays)
    return path


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def certify_file(tmp_path: Path, model, method: str, **kwargs) -> tuple[lipsdp.Result, Path]:
    res = lipsdp.estimate(model, method, **kwargs)
    return res, res.save_certificate(tmp_path / "cert.json")


# -- every certificate estimate writes for the bundled examples is accepted ---------------------------
CASES = [
    ("naive", {}),
    ("sequential", {}),
    ("layer", {}),
    ("neuron", {}),
    ("anytime", {"budget": 0.5, "steps": 40}),
    ("sequential", {"split": 2}),
    ("neuron", {"split": 2}),
    ("naive", {"pair": (0, 1)}),
    ("neuron", {"pair": (1, 0)}),
]


@pytest.mark.parametrize("example", ["relu_2-10-30-20-2.npz", "tanh_controller.npz"])
@pytest.mark.parametrize(("method", "kwargs"), CASES)
def test_accepts_bundled_examples(tmp_path, example, method, kwargs):
    model = EXAMPLES / example
    if "pair" in kwargs and lipsdp.load_network(model).sizes[-1] < 2:
        pytest.skip("one output: no class pair")
    res, cert = certify_file(tmp_path, model, method, **kwargs)
    v = verify(cert, model)
    assert v.accepted, v.reason
    assert v.proven <= res.upper
    # the re-proved bound is the certified one up to rounding (it is not a looser, different bound)
    assert v.proven >= res.upper * (1 - 1e-12)


@pytest.mark.parametrize("method", ["layer", "neuron"])
def test_accepts_when_the_layer_by_layer_bound_wins(tmp_path, method):
    """A scalar leaky-ReLU chain where the layer-by-layer multipliers beat the interior point's: the
    proof must be the one of the bound reported (found by the soundness campaign: it was stale)."""
    rng = np.random.default_rng(0)
    net = Network.from_arrays([rng.random((1, 1)), rng.random((1, 1))], ["leaky_relu:0.1"])
    model = save_npz(tmp_path / "net.npz", net)
    res, cert = certify_file(tmp_path, model, method)
    v = verify(cert, model)
    assert v.accepted, v.reason
    assert v.proven <= res.upper


def test_accepts_mnist_naive(tmp_path):
    model = EXAMPLES / "mnist_784-50-10.npz"
    res, cert = certify_file(tmp_path, model, "naive", pair=(3, 5))
    v = verify(cert, model)
    assert v.accepted, v.reason
    assert v.proven <= res.upper


@pytest.mark.slow
@pytest.mark.parametrize(("method", "kwargs"), CASES)
def test_accepts_mnist_example(tmp_path, method, kwargs):
    model = EXAMPLES / "mnist_784-50-10.npz"
    _res, cert = certify_file(tmp_path, model, method, **kwargs)
    v = verify(cert, model)
    assert v.accepted, v.reason


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(REALNETS.glob("*.npz")) if REALNETS.is_dir() else [], ids=lambda p: p.name)
@pytest.mark.parametrize("method", ["naive", "sequential", "neuron"])
def test_accepts_realnets(tmp_path, path, method):
    net = lipsdp.load_network(path)
    if method == "neuron" and sum(net.sizes[:-1]) > 700:
        pytest.skip("large: sequential covers it")
    _res, cert = certify_file(tmp_path, path, method)
    v = verify(cert, path)
    assert v.accepted, f"{path.name} {method}: {v.reason}"


def test_realnets_present_or_skipped():
    if not REALNETS.is_dir():
        pytest.skip("../shared/realnets is absent")
    assert list(REALNETS.glob("*.npz"))


# -- transforms: localize, pair, keep, fold, scale, zero, split ----------------------------------------
def _transform_nets():
    rng = np.random.default_rng(4)
    w0, w1, w2, w3 = (rng.standard_normal(s) for s in [(6, 4), (5, 6), (5, 5), (2, 5)])
    w0[2] = 0.0  # dead neuron (zero row)
    w1[:, 4] = 0.0  # dead neuron (zero column)
    return {
        "dead_and_identity": (Network.from_arrays([w0, w1, w2, w3], ["relu", "identity", "tanh"]), {}),
        "zero_layer": (Network.from_arrays([w0, 0 * w1, w2, w3], ["relu", "identity", "tanh"]), {}),
        "box": (
            Network.from_arrays([w0, w1, w2, w3], ["relu", "relu", "leaky_relu:0.1"]),
            {"region": lipsdp.Box(np.full(4, 0.5), np.full(4, 0.6))},
        ),
        "ball": (
            Network.from_arrays([w0, w1, w2, w3], ["relu", "elu", "softplus"]),
            {"region": lipsdp.Ball(np.full(4, 0.5), 0.3)},
        ),
        "box_pair_split": (
            Network.from_arrays([w0, w1, w2, w3], ["sigmoid", "elu:2.0", "softplus"]),
            {"region": lipsdp.Box(-2.0, 1.0), "pair": (0, 1), "split": 2},
        ),
        "all_off": (
            Network.from_arrays([w0, w1, w2], ["tanh", "relu"], [None, -100.0 * np.ones(5), None]),
            {"region": lipsdp.Box(-0.1, 0.1)},
        ),
        "extreme": (
            Network.from_arrays([w0 * 1e300, w1 * 1e-300, w2 * 1e-150, w3 * 1e140], ["relu", "tanh", "leaky_relu:0.5"]),
            {},
        ),
    }


@pytest.mark.parametrize("name", list(_transform_nets()))
@pytest.mark.parametrize("method", ["naive", "sequential", "neuron"])
def test_accepts_transformed_networks(tmp_path, name, method):
    net, kwargs = _transform_nets()[name]
    model = save_npz(tmp_path / "net.npz", net)
    res, cert = certify_file(tmp_path, model, method, **kwargs)
    v = verify(cert, model)
    assert v.accepted, v.reason
    assert v.proven <= res.upper
    ops = {s.op for s in res.proof.steps} | {s.op for p in res.proof.pieces for s in p.steps}
    expected = {
        "dead_and_identity": {"keep", "fold"},
        "box": {"localize", "keep"},
        "ball": {"localize"},
        "box_pair_split": {"localize", "pair"},
        "all_off": {"localize"},
        "extreme": {"scale"},
    }.get(name, set())
    assert expected <= ops
    if name in ("zero_layer", "all_off"):
        assert res.upper == 0.0 and res.proof.kind == "zero"


def test_extreme_scales_are_exact(tmp_path):
    """Constants near 1e300 and 1e-300: the proof carries exact power-of-two exponents; arb has no
    exponent range, so the re-proved bound is the certified one, not an overflowed float."""
    net, _ = _transform_nets()["extreme"]
    model = save_npz(tmp_path / "net.npz", net)
    res, cert = certify_file(tmp_path, model, "sequential")
    assert res.upper < 1e200  # 1e300 * 1e-300 * 1e-150 * 1e140: about 1e-10 times O(10)
    v = verify(cert, model)
    assert v.accepted and res.upper * (1 - 1e-12) <= v.proven <= res.upper


# -- exact constants: rho one ulp below rho* is rejected ----------------------------------------------
def _linear_certificate(tmp_path: Path, rho: float, kind: str, upper: float | None = None) -> tuple[Path, Path]:
    net = Network.from_arrays([np.diag([3.0, 1.0])], [])
    model = save_npz(tmp_path / "diag.npz", net)
    if kind == "lmi":
        proof = Proof("lmi", rho=rho, multipliers=np.zeros(0), alphas=(), betas=())
    else:
        proof = Proof("product", rhos=(rho,), lipschitz=())
    proof = replace(proof, network=network_record(net))
    upper = math.nextafter(math.sqrt(rho), math.inf) if upper is None else upper
    return write(tmp_path / "cert.json", certificate_json(proof, upper, "hand")), model


@pytest.mark.parametrize("kind", ["lmi", "product"])
def test_exact_constant_one_ulp(tmp_path, kind):
    """W = diag(3, 1): L = 3 and rho* = 9 exactly. F = rho I - W'W = diag(rho - 9, rho - 1).
    rho = 9 - 1 ulp: F has a negative eigenvalue, rejected. rho = 9: F is singular; the checker proves
    strict definiteness only, so it rejects (the bound 3 is true but not provable this way). rho = 9 + 1 ulp:
    F = diag(2^-49, 8 + 2^-49) is positive definite exactly, accepted (Jacobi scaling resolves 2^-49)."""
    below = math.nextafter(9.0, 0.0)
    above = math.nextafter(9.0, math.inf)
    cert, model = _linear_certificate(tmp_path, below, kind)
    v = verify(cert, model)
    assert not v.accepted and "positive definite" in v.reason
    cert, model = _linear_certificate(tmp_path, 9.0, kind)
    assert not verify(cert, model).accepted
    cert, model = _linear_certificate(tmp_path, above, kind)
    v = verify(cert, model)
    assert v.accepted, v.reason
    assert 3.0 < v.proven <= math.nextafter(math.sqrt(above), math.inf)
    cert, model = _linear_certificate(tmp_path, 9.0 * (1 + 1e-12), kind)
    assert verify(cert, model).accepted


def test_claim_below_sqrt_rho_rejected(tmp_path):
    cert, model = _linear_certificate(tmp_path, 9.0 * (1 + 1e-12), "lmi", upper=3.0)
    v = verify(cert, model)
    assert not v.accepted and "claimed upper bound" in v.reason
    assert v.proven > 3.0


def _nonnegative_relu(seed: int = 0) -> tuple[Network, float]:
    """Nonnegative weights, zero biases: every neuron is active for x >= 0, so the Jacobian W_1 W_0 is
    attained and L = ||W_1 W_0||_2 exactly."""
    rng = np.random.default_rng(seed)
    w0, w1 = rng.random((7, 4)), rng.random((3, 7))
    net = Network.from_arrays([w0, w1], "relu")
    return net, float(np.linalg.norm(w1 @ w0, 2))


def _tamper(cert: Path, edit) -> Path:
    data = json.loads(cert.read_text())
    edit(data)
    return write(cert.parent / "tampered.json", data)


def _scale_exponent(proof: dict) -> int:
    return sum(sum(s["exponents"]) for s in proof["steps"] if s["op"] == "scale")


@pytest.mark.parametrize("method", ["sequential", "neuron"])
def test_rho_below_exact_constant_rejected(tmp_path, method):
    """The true L is ||W_1 W_0||; a rho below L^2 in the certificate (whatever the multipliers) cannot
    be a proof, so it must be rejected; the untouched certificate is accepted."""
    net, exact = _nonnegative_relu()
    model = save_npz(tmp_path / "net.npz", net)
    res, cert = certify_file(tmp_path, model, method)
    assert res.upper >= exact
    assert verify(cert, model).accepted

    def lower_rho(data):
        e = _scale_exponent(data["proof"])  # rho is for the scaled network: L^2 4^e there
        data["proof"]["rho"] = (exact**2 * 4.0**e * (1 - 1e-9)).hex()
        data["claim"]["upper"] = (exact * (1 - 1e-10)).hex()

    v = verify(_tamper(cert, lower_rho), model)
    assert not v.accepted and "positive definite" in v.reason


def test_negated_multiplier_rejected(tmp_path):
    _res, cert = certify_file(tmp_path, EXAMPLES / "relu_2-10-30-20-2.npz", "neuron")

    def negate(data):
        t = data["proof"]["multipliers"]
        i = int(np.argmax([abs(float.fromhex(x)) for x in t]))
        t[i] = (-float.fromhex(t[i])).hex()

    v = verify(_tamper(cert, negate), EXAMPLES / "relu_2-10-30-20-2.npz")
    assert not v.accepted and "multiplier" in v.reason


def test_changed_weights_rejected_by_hash(tmp_path):
    net, _ = _nonnegative_relu()
    model = save_npz(tmp_path / "net.npz", net)
    _, cert = certify_file(tmp_path, model, "sequential")
    w = [x.copy() for x in net.weights]
    w[1][0, 0] = math.nextafter(w[1][0, 0], 2.0)  # one ulp
    other = save_npz(tmp_path / "other.npz", Network.from_arrays(w, "relu"))
    v = verify(cert, other)
    assert not v.accepted and "hash mismatch" in v.reason
    biased = save_npz(tmp_path / "biased.npz", Network.from_arrays(net.weights, "relu", [None, np.ones(3)]))
    assert "hash mismatch" in verify(cert, biased).reason


def test_narrowed_slopes_rejected(tmp_path):
    model = EXAMPLES / "tanh_controller.npz"
    _, cert = certify_file(tmp_path, model, "neuron")

    def narrow(data):
        data["proof"]["betas"][0][0] = (0.5).hex()  # tanh slopes reach 1

    v = verify(_tamper(cert, narrow), model)
    assert not v.accepted and "slope bounds" in v.reason


def test_widened_region_rejected(tmp_path):
    net, kwargs = _transform_nets()["box"]
    model = save_npz(tmp_path / "net.npz", net)
    _, cert = certify_file(tmp_path, model, "sequential", **kwargs)

    def widen(data):
        region = data["proof"]["steps"][0]["region"]
        region["low"] = [(-10.0).hex()] * 4

    v = verify(_tamper(cert, widen), model)
    assert not v.accepted and ("not constant" in v.reason or "slope" in v.reason or "linear" in v.reason)


def test_dropping_a_live_neuron_rejected(tmp_path):
    net, _ = _transform_nets()["dead_and_identity"]
    model = save_npz(tmp_path / "net.npz", net)
    _, cert = certify_file(tmp_path, model, "sequential")

    def drop(data):
        keep = data["proof"]["steps"][0]["keep"]
        keep[0] = keep[0][1:]  # neuron 0 of hidden layer 1 is alive

    v = verify(_tamper(cert, drop), model)
    assert not v.accepted and "not zero" in v.reason


def _zero_proof(data):
    data["proof"] = {"kind": "zero", "steps": []}


def _lower_lipschitz(data):
    data["proof"]["lipschitz"][0] = (0.5).hex()


def _drop_pair(data):
    data["claim"]["pair"] = None
    data["proof"]["steps"] = [s for s in data["proof"]["steps"] if s["op"] != "pair"]


def _claim_global(data):
    data["claim"]["local"] = False


def _scale_down(data):
    for s in data["proof"]["steps"]:
        if s["op"] == "scale":
            s["exponents"][0] -= 1


@pytest.mark.parametrize(
    ("edit", "method", "kwargs", "reason"),
    [
        (_zero_proof, "naive", {}, "not constant"),
        (_lower_lipschitz, "naive", {}, "below the Lipschitz constant"),
        (_drop_pair, "naive", {"pair": (0, 1)}, ""),  # the norm proof of f_0 - f_1 does not fit f
        (_claim_global, "sequential", {"region": lipsdp.Box(-0.5, 0.5)}, "does not match"),
        (_scale_down, "sequential", {}, "claimed upper bound"),
    ],
    ids=["zero", "lipschitz", "pair", "local", "scale"],
)
def test_tampered_proofs_rejected(tmp_path, edit, method, kwargs, reason):
    model = EXAMPLES / "relu_2-10-30-20-2.npz"
    _, cert = certify_file(tmp_path, model, method, **kwargs)
    assert verify(cert, model).accepted
    v = verify(_tamper(cert, edit), model)
    assert not v.accepted and reason in v.reason, v.reason


def test_malformed_certificate_is_a_clear_error(tmp_path):
    with pytest.raises(LipSDPError, match="not found"):
        verify(tmp_path / "missing.json", EXAMPLES / "tanh_controller.npz")
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(LipSDPError, match="not a valid lipsdp certificate"):
        verify(bad, EXAMPLES / "tanh_controller.npz")
    write(bad, {"format": "something else"})
    with pytest.raises(LipSDPError, match="not a valid lipsdp certificate"):
        verify(bad, EXAMPLES / "tanh_controller.npz")


# -- the file format ----------------------------------------------------------------------------------
def test_certificate_numbers_are_exact_hex(tmp_path):
    res, cert = certify_file(tmp_path, EXAMPLES / "relu_2-10-30-20-2.npz", "neuron")
    data = json.loads(cert.read_text())
    assert data["format"] == "lipsdp-certificate" and data["version"] == 1
    assert float.fromhex(data["claim"]["upper"]) == res.upper
    assert float.fromhex(data["proof"]["rho"]) == res.proof.rho
    t = np.array([float.fromhex(x) for x in data["proof"]["multipliers"]])
    np.testing.assert_array_equal(t, res.proof.multipliers)
    assert data["network"]["sha256"] == res.proof.network.sha256
    assert [a["name"] for a in data["network"]["activations"]] == ["relu"] * 3
    assert "sha256 of" in data["network"]["hashed"]


def test_proof_steps_compose():
    step = Step("scale", exponents=(1, 2))
    proof = Proof("zero").after(step)
    assert proof.steps == (step,) and not proof.local and proof.pair is None
    with pytest.raises(ValueError, match="kind"):
        Proof("magic")


def test_save_without_proof_is_a_clear_error():
    res = lipsdp.Result(upper=1.0, lower=None, method="x", verified=True, raw=1.0, seconds=0.0)
    with pytest.raises(LipSDPError, match="no proof"):
        res.save_certificate("never.json")


def test_checker_shares_no_code_with_the_certifier():
    """verify.py imports neither lmi, certificate, scaling nor the methods (an independent route)."""
    tree = ast.parse((ROOT / "src" / "lipsdp" / "verify.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    forbidden = {"lipsdp.lmi", "lipsdp.certificate", "lipsdp.scaling", "lipsdp.methods", "lipsdp.region"}
    assert not imported & forbidden
    assert not any(m.startswith("lipsdp.methods") for m in imported)


# -- command line ---------------------------------------------------------------------------------------
def test_cli_estimate_certificate_then_verify(tmp_path):
    runner = CliRunner()
    models = [str(EXAMPLES / "relu_2-10-30-20-2.npz"), str(EXAMPLES / "tanh_controller.npz")]
    out = runner.invoke(app, ["estimate", *models, "--method", "sequential", "--certificate", str(tmp_path)])
    assert out.exit_code == 0, out.output
    certs = sorted(tmp_path.glob("*.json"))
    assert [c.name for c in certs] == ["relu_2-10-30-20-2.cert.json", "tanh_controller.cert.json"]
    ok = runner.invoke(app, ["verify", str(certs[0]), models[0]])
    assert ok.exit_code == 0 and "accepted" in ok.output
    wrong = runner.invoke(app, ["verify", str(certs[0]), models[1]])
    assert wrong.exit_code == 1 and "hash mismatch" in wrong.output
    missing = runner.invoke(app, ["verify", str(tmp_path / "none.json"), models[0]])
    assert missing.exit_code == 2 and "not found" in missing.output


def test_a_network_too_large_for_the_ball_arithmetic_is_refused_clearly(tmp_path, monkeypatch):
    """Where the network's weights and LMI blocks as balls exceed the memory available, verify stops with
    one LipSDPError naming the size (never a process killed mid-check); with enough memory it proves."""
    net = he_network([5, 8, 3], 0)
    model = save_npz(tmp_path / "net.npz", net)
    _, cert = certify_file(tmp_path, model, "sequential")
    monkeypatch.setenv("LIPSDP_MEMORY_GIB", "1e-6")
    with pytest.raises(lipsdp.LipSDPError, match=r"too large for lipsdp verify's ball arithmetic: .* entries"):
        verify(cert, model)
    monkeypatch.setenv("LIPSDP_MEMORY_GIB", "1")
    assert verify(cert, model).accepted
