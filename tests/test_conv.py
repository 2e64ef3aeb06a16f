"""Convolution / pooling unrolling and the torch loader for CNNs, checked against torch's own operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipsdp
from lipsdp import UnsupportedLayerError, load_network
from lipsdp.unroll import avgpool2d_matrix, conv2d_matrix

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "c,o,k,stride,padding,dilation,groups",
    [
        (1, 3, (3, 3), 1, 0, 1, 1),
        (2, 4, (3, 2), (2, 1), (1, 2), 1, 1),
        (2, 4, (3, 3), 2, 1, 2, 2),
        (3, 3, (1, 1), 1, 0, 1, 3),
        (2, 2, (5, 5), 3, 2, 1, 1),
    ],
)
def test_conv_matrix_matches_torch(c, o, k, stride, padding, dilation, groups):
    weight = RNG.standard_normal((o, c // groups, *k))
    x = RNG.standard_normal((4, c, 8, 7))
    matrix, out_shape = conv2d_matrix(weight, (c, 8, 7), stride=stride, padding=padding, dilation=dilation,
                                      groups=groups)
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=stride, padding=padding,
                        dilation=dilation, groups=groups).numpy()
    assert expected.shape[1:] == out_shape
    np.testing.assert_allclose(x.reshape(4, -1) @ matrix.T, expected.reshape(4, -1), rtol=1e-12, atol=1e-12)


def test_conv_matrix_asymmetric_padding():
    """ONNX-style (top, left, bottom, right) padding equals explicit zero padding then a valid convolution."""
    weight = RNG.standard_normal((2, 1, 3, 3))
    x = RNG.standard_normal((3, 1, 6, 6))
    matrix, shape = conv2d_matrix(weight, (1, 6, 6), stride=2, padding=(0, 1, 2, 0))
    padded = F.pad(torch.from_numpy(x), (1, 0, 0, 2))  # (left, right, top, bottom)
    expected = F.conv2d(padded, torch.from_numpy(weight), stride=2).numpy()
    assert expected.shape[1:] == shape
    np.testing.assert_allclose(x.reshape(3, -1) @ matrix.T, expected.reshape(3, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,stride,padding,include", [(2, None, 0, True), (3, 2, 1, True), (3, 2, 1, False)])
def test_avgpool_matrix_matches_torch(kernel, stride, padding, include):
    x = RNG.standard_normal((3, 2, 8, 8))
    matrix, shape = avgpool2d_matrix((2, 8, 8), kernel, stride=stride, padding=padding, count_include_pad=include)
    expected = F.avg_pool2d(torch.from_numpy(x), kernel, stride=stride, padding=padding,
                            count_include_pad=include).numpy()
    assert expected.shape[1:] == shape
    np.testing.assert_allclose(x.reshape(3, -1) @ matrix.T, expected.reshape(3, -1), rtol=1e-12, atol=1e-12)


def _randomise_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=1, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding="valid", dilation=1, groups=2),
        nn.Tanh(),
        nn.AvgPool2d(3, stride=1, padding=1),
        nn.Flatten(),
        nn.BatchNorm1d(36),
        nn.Linear(36, 10),
        nn.LeakyReLU(0.1),
        nn.Dropout(0.3),
        nn.Linear(10, 3),
    ).double()
    _randomise_batchnorm(model)
    return model.eval()


def test_cnn_unrolls_to_network_with_the_same_outputs():
    model = small_cnn()
    net = load_network(model, input_shape=(1, 8, 8))
    # Conv + BatchNorm2d fold into one layer; AvgPool, Flatten, BatchNorm1d and Linear into another.
    assert net.sizes == [64, 256, 36, 10, 3]
    x = RNG.standard_normal((20, 1, 8, 8))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x.reshape(20, -1)), expected, rtol=1e-10, atol=1e-12)


def test_batchnorm_uses_running_statistics_even_in_train_mode():
    model = small_cnn()
    model.train()
    net = load_network(model, input_shape=(1, 8, 8))
    model.eval()
    x = RNG.standard_normal((5, 1, 8, 8))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x.reshape(5, -1)), expected, rtol=1e-10, atol=1e-12)


def test_batchnorm_after_activation_folds_into_the_next_layer():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 2)).double()
    _randomise_batchnorm(model)
    model.eval()
    net = load_network(model)
    assert net.sizes == [3, 5, 2]
    x = RNG.standard_normal((10, 3))
    with torch.no_grad():
        np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).numpy(), rtol=1e-12, atol=1e-12)


def test_cnn_bound_is_above_sampled_jacobian_norms():
    model = small_cnn()
    upper = lipsdp.estimate(model, "sequential", input_shape=(1, 8, 8)).upper
    from torch.func import jacrev, vmap

    x = torch.from_numpy(RNG.standard_normal((200, 64)))
    with torch.no_grad():
        jac = vmap(jacrev(lambda v: model(v.reshape(1, 1, 8, 8)).reshape(-1)))(x)
    norms = torch.linalg.matrix_norm(jac, ord=2).numpy()
    assert 0 < norms.max() <= upper


def test_small_cnn_layer_and_neuron_bounds():
    """A CNN small enough for the SDP methods: Neuron <= Layer <= naive, all above the sampled lower bound."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2)).double()
    shape = (1, 7, 7)
    res = {m: lipsdp.estimate(model, m, input_shape=shape).upper for m in ("naive", "layer", "neuron")}
    lower = lipsdp.estimate(model, "naive", input_shape=shape, lower=True, lower_samples=128, lower_steps=20).lower
    assert lower <= res["neuron"] * (1 + 1e-9)
    assert res["neuron"] <= res["layer"] * (1 + 1e-6)
    assert res["layer"] <= res["naive"] * (1 + 1e-6)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x * torch.relu(self.fc(x))


@pytest.mark.parametrize(
    "model,shape,match",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 1)), None, "input_shape"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True)), (1, 7, 7), "ceil_mode"),
        (nn.Sequential(nn.Linear(4, 4), Gated(), nn.Linear(4, 1)), None, "Gated.*custom module.*product"),
        (nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 1)), None, "MultiheadAttention"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)), None, "running statistics"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular")), (1, 5, 5), "padding_mode"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(3, 1)), (1, 5, 5), "Flatten"),
    ],
    ids=["no-input-shape", "maxpool-ceil", "product", "attention", "bn-no-stats", "circular", "no-flatten"],
)
def test_unsupported_cnn_modules(model, shape, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        load_network(model, **({} if shape is None else {"input_shape": shape}))


def test_wrong_input_shape_is_reported():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 1))
    with pytest.raises(UnsupportedLayerError, match="expects 18 input features but receives 32"):
        load_network(model, input_shape=(1, 6, 6))
