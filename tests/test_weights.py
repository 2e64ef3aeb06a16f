"""CSR weights (`lipsdp.weights`): the stored form holds exactly the numbers of the dense matrix, its
products equal the dense ones, and a CNN read with CSR weights gets the bounds, hash and certificate of
the same CNN with dense weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_conv_operator import cnn

import lipsdp
from lipsdp import reduced, weights
from lipsdp.conv import Conv2d
from lipsdp.lower import lower_bound
from lipsdp.network import dense_weights
from lipsdp.proof import network_sha256
from lipsdp.verify import verify

RNG = np.random.default_rng(11)


def sparse_matrix(shape, density=0.1, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * (rng.uniform(size=shape) < density)


def test_stored_form_follows_size_and_density(monkeypatch):
    monkeypatch.setattr(weights, "SPARSE_MIN_ENTRIES", 100)
    mostly_zero, full, small = sparse_matrix((20, 30)), RNG.standard_normal((20, 30)), sparse_matrix((5, 5))
    csr = weights.stored(mostly_zero)
    assert sp.issparse(csr) and np.array_equal(csr.toarray(), mostly_zero)
    assert csr.nnz == np.count_nonzero(mostly_zero)
    assert isinstance(weights.stored(full), np.ndarray) and isinstance(weights.stored(small), np.ndarray)
    assert isinstance(weights.stored(sp.csr_array(full)), np.ndarray)  # a dense-enough CSR input becomes dense
    assert weights.entries(csr) == 600 and weights.nonzeros(csr) == np.count_nonzero(mostly_zero)


def test_products_on_csr_equal_the_dense_ones():
    a, b = sparse_matrix((40, 30), seed=1), sparse_matrix((25, 40), seed=2)
    a[3] = 0.0
    a[:, 7] = 0.0
    ca, cb = sp.csr_array(a), sp.csr_array(b)
    s, r = RNG.uniform(0.5, 2.0, 40), RNG.uniform(0.5, 2.0, 30)
    close = {"rtol": 1e-13, "atol": 1e-13}
    assert np.allclose(weights.gram(ca, s), a.T @ np.diag(s) @ a, **close)
    assert np.allclose(weights.cogram(ca, r), a @ np.diag(r) @ a.T, **close)
    assert np.allclose(weights.chain(cb, s, ca), b @ np.diag(s) @ a, **close)
    assert np.array_equal(weights.scale_rows(ca, s).toarray(), s[:, None] * a)
    assert np.array_equal(weights.scale_columns(ca, r).toarray(), a * r[None, :])
    assert np.allclose(weights.row_norms(ca), np.linalg.norm(a, axis=1), **close)
    assert np.array_equal(weights.nonzero_rows(ca), np.any(a != 0, axis=1))
    assert np.array_equal(weights.nonzero_columns(ca), np.any(a != 0, axis=0))
    assert weights.most_per_row(ca) == weights.most_per_row(a) == np.count_nonzero(a, axis=1).max()
    assert weights.most_per_column(ca) == np.count_nonzero(a, axis=0).max()
    assert weights.largest_magnitude(ca) == np.abs(a).max()
    assert np.array_equal(weights.ldexp(ca, -3).toarray(), np.ldexp(a, -3))
    assert weights.equal(ca, a) and not weights.equal(weights.ldexp(ca, 1), a)
    assert weights.is_identity(sp.csr_array(np.eye(4))) and not weights.is_identity(ca)


def test_a_cifar_sized_convolution_is_read_as_csr_without_a_dense_matrix(tmp_path):
    """3 x 32 x 32 -> 16 x 32 x 32 (3x3, zero padding 1): 50M entries, 400 MB dense. Read from ONNX, it is
    CSR with the closed-form count of nonzeros, (3 * 32 - 2)^2 taps per channel pair, and computes the
    convolution (against torch's conv2d)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 32 * 32, 10)).double().eval()
    path = tmp_path / "conv.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 32, 32, dtype=torch.float64),), str(path), dynamo=False)
    net = lipsdp.load_network(path)
    w = net.weights[0]
    assert sp.issparse(w) and w.shape == (16 * 32 * 32, 3 * 32 * 32)
    assert w.nnz == 16 * 3 * (3 * 32 - 2) ** 2
    assert isinstance(net.operator(0), Conv2d)
    x = RNG.standard_normal((2, 3, 32, 32))
    expected = model[0](torch.from_numpy(x)).detach().numpy().reshape(2, -1)
    bias = net.biases[0]
    assert np.allclose(x.reshape(2, -1) @ w.T + bias, expected, rtol=1e-12, atol=1e-12)
    assert np.allclose(net.forward(x.reshape(2, -1)), model(torch.from_numpy(x)).detach().numpy(), rtol=1e-10,
                       atol=1e-10)


@pytest.mark.parametrize("method", ["naive", "sequential", "neuron", "anytime"])
def test_a_cnn_with_csr_weights_gets_the_dense_bounds(tmp_path, monkeypatch, method):
    """Every weight of the small CNN as CSR (threshold lowered) or dense: the same verified bound (sums in
    another order: equal to rounding), the same hash, and a certificate `lipsdp verify` accepts; sequential
    and anytime also with its wide layer eliminated (`lipsdp.reduced`; anytime then descends on the reduced
    LMI with the CSR weights as they are)."""
    monkeypatch.setattr(weights, "SPARSE_MIN_ENTRIES", 1)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(cnn(), (torch.zeros(1, 2, 12, 12, dtype=torch.float64),), str(path), dynamo=False)
    net = lipsdp.load_network(path)
    assert sp.issparse(net.weights[0]) and sp.issparse(net.weights[1])  # the convolutions (1/16 nonzero)
    dense_net = dense_weights(net)
    assert not any(sp.issparse(w) for w in dense_net.weights)
    assert network_sha256(net) == network_sha256(dense_net)
    lower = lower_bound(net).value  # on the CSR weights (sparse torch products)
    options = {"budget": None, "steps": 20} if method == "anytime" else {}
    on_csr = lipsdp.estimate(net, method, **options)
    on_dense = lipsdp.estimate(dense_net, method, **options)
    assert lower <= on_csr.upper == pytest.approx(on_dense.upper, rel=1e-9)
    assert verify(on_csr.save_certificate(tmp_path / "cert.json"), path).accepted
    if method == "sequential":
        monkeypatch.setattr(reduced, "MIN_WIDTH", 1)
        assert reduced.plan(net) == (1,)
        eliminated = lipsdp.estimate(net, method)
        assert any("eliminated" in note for note in eliminated.notes)
        assert eliminated.upper == pytest.approx(on_dense.upper, rel=1e-6)
    if method == "anytime":
        monkeypatch.setattr(reduced, "MIN_WIDTH", 1)
        sequential = lipsdp.estimate(net, "sequential").upper
        on_reduced = lipsdp.estimate(net, method, **options)
        assert any("on the reduced LMI" in note for note in on_reduced.notes)
        assert lower <= on_reduced.upper <= sequential
        assert verify(on_reduced.save_certificate(tmp_path / "reduced.json"), path).accepted
