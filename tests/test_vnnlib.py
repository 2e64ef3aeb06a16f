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
