"""Loaders: .npz, .mat and torch modules give the same network; bad inputs give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from conftest import EXAMPLES, he_network
from torch import nn

import lipsdp
from lipsdp import (
    InvalidNetworkError,
    LipSDPError,
    ModelLoadError,
    Network,
    UnsupportedLayerError,
    load_network,
)
from lipsdp.io.arrays import save_mat, save_npz

ORIGINAL_MAT = EXAMPLES / "random_weights.mat"


def to_torch(net: Network) -> nn.Sequential:
    """An nn.Sequential (float64) holding exactly the network's weights."""
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}
    layers: list[nn.Module] = []
    for k, (w, b) in enumerate(zip(net.weights, net.biases)):
        lin = nn.Linear(w.shape[1], w.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if k < net.depth:
            a = net.activations[k]
            layers.append(nn.LeakyReLU(a.param) if a.name == "leaky_relu" else acts[a.name]())
    return nn.Sequential(*layers)


def assert_same_network(a: Network, b: Network) -> None:
    assert len(a.weights) == len(b.weights)
    for wa, wb, ba, bb in zip(a.weights, b.weights, a.biases, b.biases):
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(ba, bb)
    assert [x.label() for x in a.activations] == [x.label() for x in b.activations]


@pytest.mark.parametrize(
    "sizes,acts",
    [
        ([3, 6, 5, 2], "relu"),
        ([2, 4, 4, 4, 3], ["relu", "tanh", "leaky_relu:0.1"]),
        ([4, 3], []),
        ([3, 5, 1], "sigmoid"),
    ],
    ids=["relu", "mixed", "single-weight", "one-hidden"],
)
def test_npz_mat_torch_agree(tmp_path, sizes, acts):
    net = he_network(sizes, 3, acts, bias_scale=0.5)
    save_npz(net, tmp_path / "net.npz")
    save_mat(net, tmp_path / "net.mat")
    loaded = {
        "npz": load_network(tmp_path / "net.npz"),
        "mat": load_network(tmp_path / "net.mat"),
        "torch": load_network(to_torch(net)),
    }
    for other in loaded.values():
        assert_same_network(net, other)
    ref = {m: lipsdp.estimate(net, m).upper for m in ("sequential", "neuron")}
    for source in (tmp_path / "net.npz", tmp_path / "net.mat", to_torch(net)):
        for m, value in ref.items():
            assert lipsdp.estimate(source, m).upper == value


def test_original_mat_and_bundled_npz_agree(original_net):
    assert_same_network(load_network(ORIGINAL_MAT), original_net)
    assert_same_network(load_network(EXAMPLES / "relu_2-10-30-20-2.mat"), original_net)
    assert original_net.sizes == [2, 10, 30, 20, 2]


@pytest.mark.parametrize("name", ["mnist_784-50-10", "tanh_controller"])
def test_bundled_examples_load(name):
    a, b = load_network(EXAMPLES / f"{name}.npz"), load_network(EXAMPLES / f"{name}.mat")
    assert_same_network(a, b)


def test_torch_forward_matches_every_supported_module():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.LeakyReLU(0.2),
        nn.Dropout(0.5),
        nn.Linear(8, 8),
        nn.ELU(alpha=1.5),
        nn.Identity(),
        nn.Sequential(nn.Linear(8, 6), nn.Softplus()),
        nn.Linear(6, 5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
        nn.Tanh(),
    ).double()
    model.eval()
    net = load_network(model)
    assert [a.name for a in net.activations] == ["leaky_relu", "elu", "softplus", "sigmoid", "tanh"]
    x = np.random.default_rng(0).standard_normal((16, 4)) * 3
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-10, atol=1e-12)
    res = lipsdp.estimate(model, "sequential", lower=True, lower_samples=64, lower_steps=10)
    assert 0 < res.lower <= res.upper


def test_torch_single_linear():
    lin = nn.Linear(3, 2)
    truth = np.linalg.norm(lin.weight.detach().double().numpy(), 2)
    for model in (lin, nn.Sequential(lin)):
        upper = lipsdp.estimate(model, "neuron").upper
        assert truth <= upper <= truth * (1 + 1e-6)


def test_torch_model_ending_in_tanh():
    """tanh(diag(3, 1) x): L = 3, attained at x = 0."""
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(torch.tensor([3.0, 1.0])))
    model = nn.Sequential(lin, nn.Tanh())
    net = load_network(model)
    assert net.depth == 1 and net.activations[0].name == "tanh"
    x = np.random.default_rng(1).standard_normal((5, 2))
    np.testing.assert_allclose(net.forward(x), np.tanh(x * [3.0, 1.0]), rtol=1e-6)  # float32 weights
    for method in ("naive", "sequential", "layer", "neuron"):
        assert 3.0 <= lipsdp.estimate(model, method).upper <= 3.0 * (1 + 1e-6)


def test_float32_torch_weights_are_read_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net = load_network(model)
    np.testing.assert_array_equal(net.weights[0], model[0].weight.detach().numpy().astype(np.float64))


@pytest.mark.parametrize(
    "model,match",
    [
        (nn.Sequential(nn.Linear(2, 3), nn.ReLU6(), nn.Linear(3, 1)), "ReLU6"),
        (nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()), "Conv2d"),
        (nn.Sequential(nn.ReLU(), nn.Linear(2, 1)), "starts with an activation"),
        (nn.Sequential(nn.ReLU()), "no Linear"),
    ],
    ids=["relu6", "conv", "leading-activation", "no-linear"],
)
def test_unsupported_torch_modules(model, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        load_network(model)


def test_softplus_with_other_beta_is_refused():
    """nn.Softplus(beta=2) is softplus(2x)/2; reading it as the beta=1 function would be wrong."""
    model = nn.Sequential(nn.Linear(2, 3), nn.Softplus(beta=2.0), nn.Linear(3, 1))
    with pytest.raises(UnsupportedLayerError, match="beta=2"):
        load_network(model)


# -- bad files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_network(tmp_path / "nope.npz")


@pytest.mark.parametrize("suffix", [".npz", ".mat"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="garbage"):
        load_network(path)


@pytest.mark.parametrize("suffix", [".npz", ".mat"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError):
        load_network(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(ModelLoadError, match=r"\.npz, \.mat, \.onnx"):
        load_network(path)


def test_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        load_network(tmp_path)


def test_unknown_object():
    with pytest.raises(ModelLoadError, match="dict"):
        load_network({"W0": np.eye(2)})


def test_npz_without_weights(tmp_path):
    np.savez(tmp_path / "x.npz", A=np.eye(2))
    with pytest.raises(ModelLoadError, match="no weight arrays"):
        load_network(tmp_path / "x.npz")


def test_npz_single_array(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.eye(2))
    with pytest.raises(ModelLoadError, match="single array"):
        load_network(path)


def test_npz_gap_in_numbering(tmp_path):
    np.savez(tmp_path / "x.npz", W0=np.eye(2), W2=np.eye(2))
    with pytest.raises(ModelLoadError, match="without gaps"):
        load_network(tmp_path / "x.npz")


def test_npz_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", W0=np.array([np.eye(2), None], dtype=object))
    with pytest.raises(ModelLoadError):
        load_network(tmp_path / "x.npz")


def test_npz_mismatched_shapes_name_the_file(tmp_path):
    np.savez(tmp_path / "bad.npz", W0=np.ones((3, 2)), W1=np.ones((1, 4)))
    with pytest.raises(InvalidNetworkError, match="bad.npz.*takes 4 inputs"):
        load_network(tmp_path / "bad.npz")


def test_npz_nan_weights(tmp_path):
    np.savez(tmp_path / "nan.npz", W0=np.full((3, 2), np.nan), W1=np.ones((1, 3)))
    with pytest.raises(InvalidNetworkError, match="NaN"):
        load_network(tmp_path / "nan.npz")


def test_npz_unknown_activation(tmp_path):
    np.savez(tmp_path / "act.npz", W0=np.ones((3, 2)), W1=np.ones((1, 3)), activations=np.array(["gelu"]))
    with pytest.raises(InvalidNetworkError, match="unknown activation 'gelu'"):
        load_network(tmp_path / "act.npz")


def test_mat_without_weights(tmp_path):
    scipy.io.savemat(tmp_path / "x.mat", {"V": np.eye(2)})
    with pytest.raises(ModelLoadError, match="no cell array named 'weights' or 'W'"):
        load_network(tmp_path / "x.mat")


def test_all_load_errors_are_lipsdp_errors(tmp_path):
    for bad in (tmp_path / "missing.mat", tmp_path):
        with pytest.raises(LipSDPError):
            lipsdp.estimate(bad, "naive")
