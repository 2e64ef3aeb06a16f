"""The VNN-LIB reader: boxes, labels and output conditions of real VNN-COMP properties and hand-written ones."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lipsdp import ModelLoadError
from lipsdp.io.vnnlib import read_vnnlib

REALNETS = Path(__file__).resolve().parents[2] / "shared" / "realnets"
MNISTFC = REALNETS / "vnnlib" / "mnistfc"
needs_realnets = pytest.mark.skipif(not MNISTFC.is_dir(), reason="../shared/realnets is not available")


def header_label(path: Path) -> int:
    """The label the benchmark authors wrote in the file's first comment ('... with label: 8.')."""
    match = re.search(r"label:\s*(\d+)", path.read_text().splitlines()[0])
    assert match, path
    return int(match.group(1))


@needs_realnets
def test_mnistfc_properties_are_boxes_around_images():
    paths = sorted(MNISTFC.glob("*.vnnlib"))
    assert len(paths) == 30
    for path in paths:
        prop = read_vnnlib(path)
        eps = float(path.stem.split("_")[-1])  # prop_<index>_<eps>
        assert prop.low.shape == prop.high.shape == (784,)
        assert prop.n_outputs == 10
        assert prop.label == header_label(path)
        assert prop.targets == tuple(j for j in range(10) if j != prop.label)
        # The box is [x - eps, x + eps] clipped to [0, 1], stored in float32.
        assert np.all(prop.low >= 0.0) and np.all(prop.high <= 1.0)
        assert prop.eps == pytest.approx(eps, rel=1e-6)
        width = prop.high - prop.low
        assert np.all(width <= 2 * eps * (1 + 1e-6))
        assert np.mean(np.isclose(width, 2 * eps, rtol=1e-6)) > 0.05  # unclipped (stroke) pixels keep the full width
        # A plausible MNIST digit: mostly dark background, some bright strokes.
        assert 0.5 < np.mean(prop.center < 0.1) < 0.95
        assert np.max(prop.center) > 0.9
        assert prop.l2_radius <= eps * np.sqrt(784) * (1 + 1e-12)


@needs_realnets
@pytest.mark.parametrize("folder,n_in", [("oval21", 3072), ("resnet2b", 3072), ("maxpool", 784)])
def test_other_benchmark_forms(folder, n_in):
    """'(and (<= Y_label Y_j))' (oval21) and '(and (>= Y_j Y_label))' forms give the same kind of property."""
    for path in sorted((REALNETS / "vnnlib" / folder).glob("*.vnnlib")):
        prop = read_vnnlib(path)
        assert prop.low.size == n_in and prop.n_outputs == 10
        assert prop.label is not None and len(prop.targets) == 9
        text = path.read_text()
        assert f"Y_{prop.label}" in text
        if folder != "oval21":
            assert prop.label == header_label(path)


def test_handwritten_forms(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text(
        "; two inputs, three outputs\n"
        "(declare-const X_0 Real)\n(declare-const X_1 Real)\n"
        "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n(declare-const Y_2 Real)\n"
        "(assert (<= X_0 1.5))\n(assert (>= X_0 -0.5))\n"
        "(assert (<= -2e-1 X_1))\n(assert (>= 0.25 X_1))  ; the constant first\n"
        "(assert (<= Y_2 Y_0))\n"
    )
    prop = read_vnnlib(path)
    np.testing.assert_array_equal(prop.low, [-0.5, -0.2])
    np.testing.assert_array_equal(prop.high, [1.5, 0.25])
    np.testing.assert_allclose(prop.center, [0.5, 0.025])
    assert prop.eps == pytest.approx(1.0)
    assert prop.l2_radius == pytest.approx(np.hypot(1.0, 0.225))
    assert prop.label == 2 and prop.targets == (0,)
    assert prop.violated_by(np.array([1.0, 5.0, 0.5]))  # Y_2 <= Y_0
    assert not prop.violated_by(np.array([0.4, 5.0, 0.5]))
    np.testing.assert_array_equal(prop.violated_by(np.array([[1.0, 0, 0.5], [0.0, 0, 0.5]])), [True, False])


def test_threshold_conditions_are_kept_without_a_label(tmp_path):
    """An ACAS Xu-style condition (a threshold, a conjunction) is read but is not a robustness property."""
    path = tmp_path / "acas.vnnlib"
    path.write_text(
        "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
        "(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
        "(assert (or (and (>= Y_0 3.5) (<= Y_1 Y_0)) (and (> Y_1 10))))\n"
    )
    prop = read_vnnlib(path)
    assert prop.label is None and prop.targets == ()
    assert prop.violated_by(np.array([4.0, 1.0]))  # first disjunct
    assert not prop.violated_by(np.array([4.0, 5.0]))
    assert prop.violated_by(np.array([0.0, 11.0]))  # second disjunct
    assert not prop.violated_by(np.array([3.0, 1.0]))


@pytest.mark.parametrize(
    "body,message",
    [
        ("(assert (<= X_0 1))", "lacks a lower or an upper bound"),
        ("(assert (<= X_0 1)) (assert (>= X_0 2))", "box is empty"),
        ("(assert (<= X_7 1)) (assert (>= X_0 0))", "X_7 is used but not declared"),
        ("(assert (<= X_0 1)) (assert (>= X_0 0)", "unclosed"),
        ("(assert (<= X_0 1))) (assert (>= X_0 0))", "unbalanced"),
        ("(assert (<= X_0 one)) (assert (>= X_0 0))", "must compare an input with a number"),
        ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 (* 2 Y_0)))", "neither an output"),
        ("(assert (<= X_0 1)) (assert (>= X_0 0)) (check-sat)", "'check-sat' is not supported"),
        ("(assert (<= X_0 1)) (assert (>= X_0 0))", None),  # no output condition
        ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert " + "(and " * 20000 + "(<= Y_0 1)" + ")" * 20001,
         "nested too deeply"),
    ],
)
def test_errors_name_the_problem(tmp_path, body, message):
    path = tmp_path / "bad.vnnlib"
    path.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n" + body)
    with pytest.raises(ModelLoadError, match=re.escape(message) if message else "no output condition") as info:
        read_vnnlib(path)
    assert "bad.vnnlib" in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_vnnlib(tmp_path / "missing.vnnlib")
    path = tmp_path / "binary.vnnlib"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ModelLoadError, match="UTF-8"):
        read_vnnlib(path)


# -- certification of the properties -------------------------------------------------------------------
MNIST_NET = REALNETS / "fc" / "mnist-net_256x2.onnx"


def onnxruntime_logits(x: np.ndarray) -> np.ndarray:
    """The original network run by onnxruntime: an independent falsifier for certified properties."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(MNIST_NET), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"0": row.reshape(1, 784, 1).astype(np.float32)})[0] for row in x])


def falsify(prop, samples: int = 200, seed: int = 0) -> bool:
    """True if some corner or random point of the box is a counter-example (checked with onnxruntime)."""
    rng = np.random.default_rng(seed)
    corners = np.where(rng.random((samples, prop.low.size)) < 0.5, prop.low, prop.high)
    inside = prop.low + rng.random((samples, prop.low.size)) * (prop.high - prop.low)
    points = np.concatenate([corners, inside, prop.center[None]])
    return bool(np.any(prop.violated_by(onnxruntime_logits(points))))


@needs_realnets
def test_labels_agree_with_the_network_at_the_centres():
    pytest.importorskip("onnx")
    import lipsdp

    net = lipsdp.load_network(MNIST_NET)
    props = [read_vnnlib(p) for p in sorted(MNISTFC.glob("*.vnnlib"))]
    predicted = np.argmax(net.forward(np.array([p.center for p in props])), axis=1)
    assert np.mean(predicted == [p.label for p in props]) >= 0.9  # measured: 30 of 30
    assert not any(falsify(p, samples=20) for p in props[:4])  # the boxes hold no easy counter-example


@needs_realnets
def test_local_margin_certifies_and_is_sound():
    """prop_11_0.03 is certified by local bounds on its box (naive: 9 cheap solves); a global pair bound of
    this net (about 900 for naive) is far too large at this radius."""
    pytest.importorskip("onnx")
    from lipsdp.robustness import certify_properties

    paths = [MNISTFC / "prop_11_0.03.vnnlib", MNISTFC / "prop_10_0.03.vnnlib"]
    local = certify_properties(MNIST_NET, paths, method="naive", bound="local")
    assert [c.certified for c in local] == [True, False]
    cert = local[0]
    assert cert.label == cert.predicted == 0 and cert.slack > 0
    assert cert.radius == pytest.approx(np.linalg.norm((read_vnnlib(paths[0]).high - read_vnnlib(paths[0]).low) / 2))
    assert sorted(cert.lipschitz) == [j for j in range(10) if j != 0]
    assert all(cert.margins[j] > cert.lipschitz[j] * cert.radius for j in cert.lipschitz)
    assert not falsify(read_vnnlib(paths[0]))
    failed = local[1]  # bounded smallest margin first, and no further once one class fails
    assert len(failed.lipschitz) == 1
    (j,) = failed.lipschitz
    assert failed.margins[j] == min(failed.margins.values())
    assert failed.margins[j] <= failed.lipschitz[j] * failed.radius
    glob_ = certify_properties(MNIST_NET, paths[:1], method="naive", bound="pair")[0]
    assert not glob_.certified and min(glob_.lipschitz.values()) > 100


@needs_realnets
def test_tiny_box_is_certified_by_global_pair_bounds(tmp_path):
    """A box of l_inf radius 2e-5 around the prop_11 image (margins about 1, naive pair bounds about 1000,
    l2 radius 5.6e-4): the global class-pair bounds certify it, and
    onnxruntime finds no counter-example at its corners."""
    pytest.importorskip("onnx")
    from lipsdp.robustness import certify_properties

    prop = read_vnnlib(MNISTFC / "prop_11_0.03.vnnlib")
    low, high = np.clip(prop.center - 2e-5, 0, 1), np.clip(prop.center + 2e-5, 0, 1)
    lines = [f"(declare-const X_{i} Real)" for i in range(784)] + [f"(declare-const Y_{j} Real)" for j in range(10)]
    lines += [f"(assert (<= X_{i} {float(high[i])!r}))\n(assert (>= X_{i} {float(low[i])!r}))" for i in range(784)]
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_0))" for j in range(1, 10)) + "))")
    path = tmp_path / "tiny.vnnlib"
    path.write_text("\n".join(lines))
    (cert,) = certify_properties(MNIST_NET, [path], method="naive", bound="pair")
    assert cert.certified and cert.label == 0
    assert not falsify(read_vnnlib(path))
    # The bound used is the global one: valid anywhere, so also larger than the local one on the 0.03 box.
    local = certify_properties(MNIST_NET, [MNISTFC / "prop_11_0.03.vnnlib"], method="naive", bound="local")[0]
    assert all(cert.lipschitz[j] >= local.lipschitz[j] for j in local.lipschitz)
    # bound='global': sqrt(2) times one bound of the whole network, for every class pair (never below the
    # pair's own bound: ||f_i - f_j|| <= sqrt(2) ||f||)
    import lipsdp

    (whole,) = certify_properties(MNIST_NET, [path], method="naive", bound="global")
    upper = lipsdp.estimate(MNIST_NET, "naive").upper
    assert sorted(whole.lipschitz) == sorted(cert.lipschitz)
    for j, value in whole.lipschitz.items():
        assert value == pytest.approx(np.sqrt(2.0) * upper, rel=1e-15) and value >= np.sqrt(2.0) * upper
        assert value >= cert.lipschitz[j]
    assert whole.certified == all(cert.margins[j] > whole.lipschitz[j] * cert.radius for j in cert.margins)


@needs_realnets
def test_region_box_gives_a_local_bound():
    pytest.importorskip("onnx")
    import lipsdp

    prop = read_vnnlib(MNISTFC / "prop_11_0.03.vnnlib")
    local = lipsdp.estimate(MNIST_NET, "naive", region=prop.region, pair=(0, 1)).upper
    global_ = lipsdp.estimate(MNIST_NET, "naive", pair=(0, 1)).upper
    assert 0 < local < global_ / 10


@needs_realnets
def test_cli_certifies_vnnlib_properties():
    pytest.importorskip("onnx")
    import json

    from typer.testing import CliRunner

    from lipsdp.cli import app

    paths = [str(MNISTFC / "prop_11_0.03.vnnlib"), str(MNISTFC / "prop_10_0.03.vnnlib")]
    result = CliRunner().invoke(app, ["certify", str(MNIST_NET), *paths, "--bound", "local", "--method", "naive",
                                      "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [p["certified"] for p in payload["properties"]] == [True, False]
    assert payload["properties"][0]["label"] == 0
    table = CliRunner().invoke(app, ["certify", str(MNIST_NET), *paths, "--bound", "local", "--method", "naive"])
    assert table.exit_code == 0 and "1 of 2 properties certified" in table.stdout
    whole = CliRunner().invoke(app, ["certify", str(MNIST_NET), *paths, "--bound", "global", "--method", "naive",
                                     "--json"])
    assert whole.exit_code == 0, whole.output
    rows = json.loads(whole.stdout)["properties"]
    # one global bound for every class pair: all the Lipschitz values of a property are the same number
    assert all(len(set(r["lipschitz"].values())) == 1 and r["bound"] == "global" for r in rows if r["lipschitz"])
    refused = CliRunner().invoke(app, ["certify", str(MNIST_NET), paths[0], "--bound", "box"])
    assert refused.exit_code == 2 and "'pair', 'global' or 'local'" in refused.output


@needs_realnets
@pytest.mark.slow
def test_all_mnistfc_properties_local_sequential_are_sound():
    """All 30 properties with local sequential bounds (about 25 s on one core): measured 1 certified
    (prop_11_0.03); every certified box survives an onnxruntime falsification attempt."""
    pytest.importorskip("onnx")
    from lipsdp.robustness import certify_properties

    paths = sorted(MNISTFC.glob("*.vnnlib"))
    results = certify_properties(MNIST_NET, paths, method="sequential", bound="local")
    certified = [Path(r.path) for r in results if r.certified]
    assert MNISTFC / "prop_11_0.03.vnnlib" in certified
    for path in certified:
        assert not falsify(read_vnnlib(path), samples=500, seed=1)


def _robustness_property(low, high, n_out, label):
    from lipsdp.io.vnnlib import LinearConstraint, VnnlibProperty

    targets = tuple(j for j in range(n_out) if j != label)
    unsafe = [[LinearConstraint(np.eye(n_out)[j] - np.eye(n_out)[label], 0.0)] for j in targets]  # Y_label <= Y_j
    return VnnlibProperty("box", np.asarray(low, float), np.asarray(high, float), n_out, unsafe, label, targets)


def test_secant_floor_of_a_linear_net_is_its_exact_constant_on_the_box():
    """f = A x + b: on the box, f_l - f_j moves only along the coordinates of nonzero width, so its exact
    Lipschitz constant there is ||(a_l - a_j) restricted to them||, which the secant reproduces; a property is
    beyond reach exactly when its margin is at most that times the l2 radius, and then it is never certified."""
    import lipsdp
    from lipsdp.robustness import certify_properties, secant_floors

    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    net = lipsdp.Network.from_arrays([a], [], [b])
    x0 = rng.standard_normal(5)
    half = np.array([0.1, 0.05, 0.0, 0.2, 0.02])  # one coordinate of zero width
    label = int(np.argmax(a @ x0 + b))
    floors = secant_floors(net, x0 - half, x0 + half, label, [j for j in range(3) if j != label])
    for j, floor in floors.items():
        exact = np.linalg.norm(np.delete(a[label] - a[j], 2))
        assert exact * (1 - 1e-6) <= floor <= exact  # the rounding allowance only lowers it
    for scale in (0.5, 1.0, 4.0, 20.0):  # growing boxes: reachable first, beyond reach later
        prop = _robustness_property(x0 - scale * half, x0 + scale * half, 3, label)
        (cert,) = certify_properties(net, [prop], method="naive", bound="local")
        radius = prop.l2_radius
        expected = [j for j in sorted(floors, key=lambda j: cert.margins[j]) if floors[j] * radius >= cert.margins[j]]
        assert cert.beyond_reach == (expected[0] if expected else None)
        if cert.beyond_reach is not None:
            assert not cert.certified and cert.lipschitz == {}  # no solve was spent on it
            # the slack the tightest Lipschitz bound could leave: margin - exact constant * radius <= 0
            j = cert.beyond_reach
            assert cert.slack <= 0
            assert cert.slack == pytest.approx(cert.margins[j] - floors[j] * radius, rel=1e-6)


def test_pair_bounds_are_solved_only_for_properties_a_margin_can_prove(monkeypatch):
    """bound='pair' bounds the class pairs a margin can still use: none for a box beyond reach (its secant
    already too steep) or a misclassified centre; a property's classes go smallest margin first, and stop at
    the first that fails; a pair is solved once for all properties."""
    import lipsdp
    from lipsdp import robustness

    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    net = lipsdp.Network.from_arrays([a], [], [b])
    asked = []
    real = robustness.pair_bounds
    monkeypatch.setattr(robustness, "pair_bounds", lambda n, pairs, *args, **kw: asked.extend(pairs) or
                        real(n, pairs, *args, **kw))
    x0 = rng.standard_normal(5)
    y = a @ x0 + b
    label = int(np.argmax(y))
    others = [j for j in range(3) if j != label]
    first = min(others, key=lambda j: y[label] - y[j])  # the smallest margin
    # a box flat in coordinate 2: the secant sees ||a_l - a_j|| without that coordinate, the (global) pair
    # bound the whole norm; sized between the two for the first class, so it fails there, yet is in reach
    half = np.array([1.0, 1.0, 0.0, 1.0, 1.0])
    exact = np.linalg.norm(a[label] - a[first])
    secant = np.linalg.norm(np.delete(a[label] - a[first], 2))
    scale = (y[label] - y[first]) / (np.linalg.norm(half) * 0.5 * (exact + secant))
    tiny = _robustness_property(x0 - 1e-6, x0 + 1e-6, 3, label)  # certified by any sane bound
    fails = _robustness_property(x0 - scale * half, x0 + scale * half, 3, label)
    huge = _robustness_property(x0 - 50.0, x0 + 50.0, 3, label)  # beyond reach
    wrong = _robustness_property(x0 - 1e-6, x0 + 1e-6, 3, (label + 1) % 3)  # misclassified centre
    certs = robustness.certify_properties(net, [fails, tiny, huge, wrong], method="naive", bound="pair")
    assert sorted(asked) == sorted((min(label, j), max(label, j)) for j in others)  # each pair once
    assert [c.certified for c in certs] == [False, True, False, False]
    assert certs[0].beyond_reach is None and list(certs[0].lipschitz) == [first]  # stopped at its first class
    assert certs[2].beyond_reach is not None and certs[2].lipschitz == {} and certs[2].slack <= 0
    assert certs[3].lipschitz == {}
    for j, value in certs[1].lipschitz.items():  # the linear pair's exact constant, verified from above
        exact = np.linalg.norm(a[label] - a[j])
        assert exact <= value <= exact * (1 + 1e-9)


def test_secant_floor_never_exceeds_a_verified_local_bound():
    """On a ReLU net the secant is a lower bound of the margin's Lipschitz constant on the box: below the
    verified local LipSDP-Neuron bound of every class pair."""
    import lipsdp
    from lipsdp.robustness import secant_floors

    rng = np.random.default_rng(5)
    net = lipsdp.Network.from_arrays(
        [rng.standard_normal((12, 6)), rng.standard_normal((8, 12)), rng.standard_normal((4, 8))], "relu",
        [rng.standard_normal(12), rng.standard_normal(8), None])
    for trial in range(3):
        x0, eps = rng.standard_normal(6), 0.3 * (trial + 1)
        label = int(np.argmax(net.forward(x0)))
        targets = [j for j in range(4) if j != label]
        floors = secant_floors(net, x0 - eps, x0 + eps, label, targets)
        for j in targets:
            local = lipsdp.estimate(net, "neuron", pair=(label, j), region=lipsdp.Box(x0 - eps, x0 + eps)).upper
            assert 0 < floors[j] <= local
