"""MATLAB v7.3 (HDF5) .mat files: the same layouts as v5, the same bounds, clear errors otherwise."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.io
from conftest import EXAMPLES
from matlab_v73 import Cell, write_mat73, write_network

import lipsdp
from lipsdp import ModelLoadError, load_network


def test_writer_makes_what_scipy_calls_v73(tmp_path):
    """The test writer's files are what MATLAB writes as far as scipy can tell (and it cannot read them)."""
    path = tmp_path / "w.mat"
    write_mat73(path, {"weights": Cell([np.ones((2, 3))])})
    assert scipy.io.matlab.matfile_version(str(path)) == (2, 0)
    with pytest.raises(NotImplementedError):
        scipy.io.loadmat(path)


def test_original_net_v73_gives_the_same_bound_as_npz(tmp_path):
    npz = EXAMPLES / "relu_2-10-30-20-2.npz"
    net = load_network(npz)
    path = tmp_path / "relu.mat"
    write_mat73(path, {"weights": Cell(net.weights)})  # the original LipSDP layout: weights only
    loaded = load_network(path)
    assert loaded.sizes == net.sizes
    for a, b in zip(loaded.weights, net.weights):
        np.testing.assert_array_equal(a, b)  # not transposed, not reordered
    assert lipsdp.estimate(path).upper == lipsdp.estimate(npz).upper


@pytest.mark.parametrize("name", ["tanh_controller", "mnist_784-50-10"])
def test_v73_matches_v5_with_biases_and_activations(tmp_path, name):
    v5 = load_network(EXAMPLES / f"{name}.mat")
    path = tmp_path / f"{name}.mat"
    write_network(path, v5)
    v73 = load_network(path)
    assert v73.sizes == v5.sizes
    assert [a.label() for a in v73.activations] == [a.label() for a in v5.activations]
    for a, b in zip(v73.weights + v73.biases, v5.weights + v5.biases):
        np.testing.assert_array_equal(a, b)


def test_single_matrix_and_plain_char_activation(tmp_path):
    path = tmp_path / "plain.mat"
    w = np.arange(6.0).reshape(2, 3)
    write_mat73(path, {"weights": w})
    assert load_network(path).weights[0].tolist() == w.tolist()
    path = tmp_path / "act.mat"
    write_mat73(path, {"weights": Cell([np.ones((3, 2)), np.ones((3, 3)), np.ones((1, 3))]), "activations": "tanh"})
    assert [a.label() for a in load_network(path).activations] == ["tanh", "tanh"]


def _struct(path):
    write_mat73(path, {"x": np.ones(2)})
    with h5py.File(path, "r+") as f:
        g = f.create_group("weights")
        g.attrs["MATLAB_class"] = np.bytes_("struct")


def _external_link(path):
    other = path.with_name("other.h5")
    with h5py.File(other, "w") as f:
        f["secret"] = np.ones((2, 2))
    write_mat73(path, {"x": np.ones(2)})
    with h5py.File(path, "r+") as f:
        f["weights"] = h5py.ExternalLink(str(other), "secret")


def _external_storage(path):
    raw = path.with_name("raw.bin")
    raw.write_bytes(np.ones(4).tobytes())
    write_mat73(path, {"x": np.ones(2)})
    with h5py.File(path, "r+") as f:
        ds = f.create_dataset("weights", shape=(2, 2), dtype="<f8", external=[(str(raw), 0, 32)])
        ds.attrs["MATLAB_class"] = np.bytes_("double")


def _complex(path):
    write_mat73(path, {"x": np.ones(2)})
    with h5py.File(path, "r+") as f:
        data = np.zeros((2, 2), dtype=[("real", "<f8"), ("imag", "<f8")])
        ds = f.create_dataset("weights", data=data)
        ds.attrs["MATLAB_class"] = np.bytes_("double")


def _nested_cell(path):
    write_mat73(path, {"weights": Cell([Cell([np.ones((2, 2))])])})


def _huge_claim(path):
    write_mat73(path, {"x": np.ones(2)})
    with h5py.File(path, "r+") as f:  # a chunked dataset claims 2^40 elements in a few bytes
        ds = f.create_dataset("weights", shape=(2**20, 2**20), dtype="<f8", chunks=(1, 1))
        ds.attrs["MATLAB_class"] = np.bytes_("double")


V73_CASES = {
    "no-weights": (lambda p: write_mat73(p, {"x": np.ones((2, 2))}), "no cell array named 'weights'"),
    "struct": (_struct, "struct"),
    "external-link": (_external_link, "link"),
    "external-storage": (_external_storage, "outside the file"),
    "complex": (_complex, "complex"),
    "nested-cell": (_nested_cell, "nested"),
    "char-weights": (lambda p: write_mat73(p, {"weights": Cell(["relu"])}), "char"),
    "number-activation": (
        lambda p: write_mat73(p, {"weights": Cell([np.ones((2, 2))] * 2), "activations": Cell([np.ones(1)])}),
        "char array",
    ),
    "huge-claim": (_huge_claim, "beyond what lipsdp accepts"),
    "truncated": (
        lambda p: (write_network(p, load_network(EXAMPLES / "tanh_controller.npz")),
                   p.write_bytes(p.read_bytes()[:1500])),
        "not a readable MATLAB v7.3",
    ),
}


@pytest.mark.parametrize("case", sorted(V73_CASES))
def test_hostile_v73(case, tmp_path):
    path = tmp_path / f"{case}.mat"
    make, match = V73_CASES[case]
    make(path)
    with pytest.raises(ModelLoadError, match=match) as info:
        load_network(path)
    assert str(path) in str(info.value)
