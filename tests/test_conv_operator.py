"""Convolutions as operators (`lipsdp.conv.Conv2d`): products against the dense unrolled matrix, the
proven kernel bound on the spectral norm against the exact norm, and the loaders' record of them."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp.conv import Conv2d
from lipsdp.methods import naive as naive_module
from lipsdp.scaling import rescale
from lipsdp.verify import verify

RNG = np.random.default_rng(3)
CNN = Path(__file__).resolve().parents[2] / "shared" / "realnets" / "cnn"

# (input shape, kernel shape, stride, padding, dilation, groups)
CASES = [
    ((3, 8, 8), (4, 3, 3, 3), 1, 1, 1, 1),
    ((2, 9, 7), (4, 2, 3, 2), (2, 1), (1, 2, 0, 1), 1, 1),
    ((4, 8, 8), (4, 2, 3, 3), 2, 1, 2, 2),
    ((3, 10, 10), (5, 3, 4, 4), 2, 1, 1, 1),
    ((2, 8, 8), (3, 2, 5, 5), 3, 2, 1, 1),
    ((1, 12, 12), (1, 1, 3, 3), 1, 0, 1, 1),
    ((3, 6, 6), (6, 1, 2, 2), (1, 2), (0, 1), (2, 1), 3),
]


def make(case, seed: int = 0) -> Conv2d:
    shape, kernel, stride, padding, dilation, groups = case
    weight = np.random.default_rng(seed).standard_normal(kernel)
    return Conv2d.make(weight, shape, stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("case", CASES)
def test_products_equal_the_dense_matrix(case):
    op = make(case)
    dense = op.dense()
    assert dense.shape == op.shape
    x = RNG.standard_normal((3, op.shape[1]))
    y = RNG.standard_normal((3, op.shape[0]))
    np.testing.assert_allclose(op.apply(x), x @ dense.T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(op.apply_transpose(y), y @ dense, rtol=0, atol=1e-10)
    np.testing.assert_allclose(op.apply(x[0]), dense @ x[0], rtol=0, atol=1e-10)  # one vector
    assert op.matches(dense)
    assert not op.matches(dense * (1.0 + 2.0**-52))


@pytest.mark.parametrize("case", CASES)
def test_kernel_bound_is_above_the_exact_norm_and_close(case):
    op = make(case)
    exact = float(np.linalg.norm(op.dense(), 2))
    upper = op.norm_upper()
    assert upper >= exact
    # the torus differs from the zero-padded plane only at the border: loosest on tiny strided images
    assert upper <= 1.3 * exact
    assert op.norm_estimate() <= exact * (1.0 + 1e-12)
    assert op.norm_estimate() >= 0.95 * exact


def test_kernel_bound_is_tight_on_a_larger_image():
    op = Conv2d.make(RNG.standard_normal((4, 3, 3, 3)), (3, 24, 24), padding=1)
    exact = float(np.linalg.norm(op.dense(), 2))
    assert exact <= op.norm_upper() <= 1.02 * exact


def test_pointwise_convolution_bound_is_exact():
    """A 1x1 convolution applies the same channel matrix at every pixel: its norm is that matrix's."""
    k = RNG.standard_normal((5, 3, 1, 1))
    op = Conv2d.make(k, (3, 6, 5))
    exact = float(np.linalg.norm(k[:, :, 0, 0], 2))
    assert exact <= op.norm_upper() <= exact * (1.0 + 1e-9)


def test_zero_and_scaled_kernels():
    assert Conv2d.make(np.zeros((2, 1, 3, 3)), (1, 5, 5)).norm_upper() == 0.0
    op = make(CASES[0])
    scaled = op.scaled(-7)
    assert np.array_equal(scaled.dense(), np.ldexp(op.dense(), -7))
    assert scaled.norm_upper() >= float(np.linalg.norm(scaled.dense(), 2))


def test_kernel_that_does_not_fit_is_refused():
    with pytest.raises(lipsdp.LipSDPError, match="does not fit"):
        Conv2d.make(np.ones((1, 1, 5, 5)), (1, 3, 3))
    with pytest.raises(lipsdp.LipSDPError, match="groups"):
        Conv2d.make(np.ones((2, 2, 3, 3)), (3, 8, 8), groups=2)


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),  # folded into the conv: that layer is no longer exactly a convolution
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    ).double().eval()


def test_loaders_record_the_convolutions(tmp_path):
    model = cnn()
    net = lipsdp.load_network(model, input_shape=(2, 12, 12))
    assert isinstance(net.operator(0), Conv2d)
    assert net.operator(1) is None and net.operator(2) is None  # batch norm folded in; dense layer
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 2, 12, 12, dtype=torch.float64),), str(path), dynamo=False)
    from_onnx = lipsdp.load_network(path)
    assert isinstance(from_onnx.operator(0), Conv2d)
    assert np.array_equal(from_onnx.weights[0], net.weights[0])


def test_a_changed_weight_drops_its_operator():
    net = lipsdp.load_network(cnn(), input_shape=(2, 12, 12))
    w = net.weights[0].copy()
    w[0, 0] += 1.0
    assert replace(net, weights=(w,) + net.weights[1:]).operator(0) is None
    scaled = rescale(net, [3, 0, 0]).network  # exact power-of-two scaling keeps it, scaled
    assert scaled.operator(0) is not None
    assert np.array_equal(scaled.operator(0).dense(), scaled.weights[0])


def test_naive_with_kernel_bounds_is_sound_and_verified(tmp_path, monkeypatch):
    model = cnn()
    shape = (2, 12, 12)
    dense_bound = lipsdp.estimate(model, "naive", input_shape=shape).upper
    monkeypatch.setattr(naive_module, "DENSE_NORM_ENTRIES", 0)  # every recorded convolution by its kernel
    res = lipsdp.estimate(model, "naive", input_shape=shape)
    net = lipsdp.load_network(model, input_shape=shape)
    exact_product = math.prod(float(np.linalg.norm(w, 2)) for w in net.weights)
    assert exact_product <= dense_bound <= res.upper <= 1.1 * dense_bound
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, *shape, dtype=torch.float64),), str(path), dynamo=False)
    res = lipsdp.estimate(path, "naive")
    assert res.upper >= dense_bound
    v = verify(res.save_certificate(tmp_path / "cert.json"), path)
    assert v.accepted, v.reason


@pytest.mark.skipif(not (CNN / "cifar_base_kw.onnx").is_file(), reason="../shared/realnets absent")
def test_cifar_convolutions_bounded_by_their_kernels():
    net = lipsdp.load_network(CNN / "cifar_base_kw.onnx")
    for k in (0, 1):
        op = net.operator(k)
        assert isinstance(op, Conv2d)
        upper = op.norm_upper()
        estimate = op.norm_estimate()
        assert estimate <= upper <= 1.02 * estimate


def test_holder_bound_is_a_bound_and_exact_on_selections():
    from lipsdp.methods.naive import holder_bound

    for shape in [(7, 5), (3, 11), (20, 20)]:
        w = RNG.standard_normal(shape)
        assert holder_bound(w) >= float(np.linalg.norm(w, 2))
    selection = np.eye(6)[[3, 1, 4, 0, 5, 2]]  # a permutation: norm 1
    assert 1.0 <= holder_bound(selection) <= 1.0 + 1e-14
    # the comparator rows of a lowered max: (a + b) / 2 and (a - b) / 2 of disjoint pairs, norm 1 / sqrt(2)
    comparator = np.kron(np.eye(3), np.array([[0.5, 0.5], [0.5, -0.5]]))
    assert math.sqrt(0.5) <= float(np.linalg.norm(comparator, 2)) <= holder_bound(comparator) <= 1.0 + 1e-14


def test_naive_on_layers_too_large_for_a_dense_certificate(monkeypatch):
    net = lipsdp.Network.from_arrays([RNG.standard_normal((6, 2)), np.kron(np.eye(3), [[0.5, 0.5]]),
                                      RNG.standard_normal((2, 3))], "relu")
    dense = lipsdp.estimate(net, "naive").upper
    monkeypatch.setattr(naive_module, "DENSE_NORM_SIDE", 2)  # the middle layer (3 x 6) by Hoelder only
    res = lipsdp.estimate(net, "naive")
    exact_product = math.prod(float(np.linalg.norm(w, 2)) for w in net.weights)
    assert exact_product <= dense <= res.upper
    assert res.upper == pytest.approx(dense, rel=1e-12)  # Hoelder is exact on that pairing layer
