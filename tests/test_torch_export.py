"""The torch.export front end: custom modules, their exported programs, .pt2 files, their ONNX exports and a
hand-built Network agree (forward outputs against torch, bounds against each other); residual, concatenating
and max-pooling graphs are lowered exactly (lipsdp.graph); unsupported ones are refused naming the node; .pt2 archives that would need unpickling are refused before torch reads them."""

from __future__ import annotations

import json
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipsdp
from lipsdp import ModelLoadError, Network, load_network
from lipsdp.io.torch_export import from_exported, from_module


class CustomCNN(nn.Module):
    """A forward() with functional calls, a view on x.size(0), a permute, BN, pooling and constant arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(3 * 3 * 3, 6)
        self.fc2 = nn.Linear(6, 4)
        self.drop = nn.Dropout(0.3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = (x - 0.5) / 0.25  # input normalisation
        x = F.relu(self.bn(self.conv(x)))
        x = F.avg_pool2d(x, 2)
        x = x.permute(0, 2, 3, 1)  # channels last, as a Keras model would flatten
        x = x.reshape(x.size(0), -1)
        x = self.drop(torch.tanh(self.fc1(x)))
        return self.fc2(F.leaky_relu(x, 0.1))


def torch_forward(model: nn.Module, x: np.ndarray, shape) -> np.ndarray:
    model = model.double().eval()
    with torch.no_grad():
        return model(torch.from_numpy(x.reshape(-1, *shape))).numpy().reshape(x.shape[0], -1)


def test_custom_module_matches_torch_and_its_exports(tmp_path):
    shape = (2, 6, 6)
    model = CustomCNN().eval()
    net = load_network(model, input_shape=shape)
    assert net.sizes == [72, 108, 6, 4]  # normalisation+conv+BN; pool+permute+fc1; fc2
    x = np.random.default_rng(1).uniform(0, 1, (8, 72))
    np.testing.assert_allclose(net.forward(x), torch_forward(CustomCNN(), x, shape), rtol=1e-10, atol=1e-12)
    # The exported program and a .pt2 round trip give the same numbers, hence the same bounds.
    program = torch.export.export(CustomCNN().eval(), (torch.zeros(1, *shape),))
    path = tmp_path / "cnn.pt2"
    torch.export.save(program, str(path))
    for other in (load_network(program), load_network(path)):
        for a, b in zip(other.weights + other.biases, net.weights + net.biases):
            np.testing.assert_array_equal(a, b)
    bounds = {lipsdp.estimate(m, "sequential").upper for m in (net, program, path)}
    assert len(bounds) == 1


def test_torch_export_onnx_and_hand_built_network_agree(tmp_path):
    """An MLP written as a custom module: its torch.export, its ONNX export and the Network built by hand
    from its weights give the same forward and the same bounds."""

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.layers = nn.ModuleList([nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)])

        def forward(self, x):
            for layer in self.layers[:-1]:  # a loop that unrolls into a chain
                x = torch.tanh(layer(x))
            return self.layers[-1](x)

    model = MLP().eval()
    via_export = load_network(model)  # input shape from the first Linear
    hand = Network.from_arrays(
        [layer.weight.detach().double().numpy() for layer in model.layers], "tanh",
        [layer.bias.detach().double().numpy() for layer in model.layers],
    )
    path = tmp_path / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 5), str(path), dynamo=False, input_names=["x"])
    via_onnx = load_network(path)
    x = np.random.default_rng(3).standard_normal((10, 5))
    expected = torch_forward(MLP(), x, (5,))
    for net in (via_export, via_onnx, hand):
        np.testing.assert_allclose(net.forward(x), expected, rtol=1e-10, atol=1e-12)
    for method in ("naive", "sequential"):
        bounds = [lipsdp.estimate(net, method).upper for net in (via_export, via_onnx, hand)]
        assert bounds[0] == bounds[1] == bounds[2]


def test_clamp_at_zero_is_relu_and_relu6_is_refused():
    class Clamped(nn.Module):
        def __init__(self, upper: float | None) -> None:
            super().__init__()
            torch.manual_seed(6)
            self.a, self.b, self.upper = nn.Linear(3, 5), nn.Linear(5, 2), upper

        def forward(self, x):
            return self.b(self.a(x).clamp(min=0.0, max=self.upper))

    net = load_network(Clamped(None))
    assert [a.name for a in net.activations] == ["relu"]
    x = np.random.default_rng(8).standard_normal((6, 3))
    np.testing.assert_allclose(net.forward(x), torch_forward(Clamped(None), x, (3,)), rtol=1e-10, atol=1e-12)
    with pytest.raises(ModelLoadError, match=r"'clamp' \(aten\.clamp\.default\) is not supported"):
        load_network(Clamped(6.0))


def test_sequential_fast_path_and_export_path_read_the_same_numbers():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2), nn.ELU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(8, 5), nn.Sigmoid(), nn.Dropout(0.1), nn.Linear(5, 2),
    ).eval()
    fast = load_network(model, input_shape=(1, 8, 8))
    export = from_module(model, input_shape=(1, 8, 8))
    assert fast.sizes == export.sizes
    assert [a.label() for a in fast.activations] == [a.label() for a in export.activations]
    for a, b in zip(fast.weights + fast.biases, export.weights + export.biases):
        np.testing.assert_array_equal(a, b)


def test_dynamic_batch_program_is_read_with_batch_one():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    program = torch.export.export(model, (torch.zeros(2, 3),), dynamic_shapes={"input": {0: torch.export.Dim("b")}})
    net = from_exported(program)
    assert net.sizes == [3, 4, 2]
    np.testing.assert_array_equal(net.weights[0], model[0].weight.detach().double().numpy())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + 2 * x)


class MaxPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return F.max_pool2d(self.conv(x), 2).flatten(1)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return -x


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        return h, torch.relu(h)


class Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.b(x))


class PoolIndices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        values, indices = F.max_pool2d(self.conv(x), 2, return_indices=True)
        return (values + indices.to(values.dtype)).flatten(1)


class BatchCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cat([self.a(x), x], dim=0)


@pytest.mark.parametrize(
    "model,shape",
    [(Residual(), None), (nn.Sequential(nn.Linear(4, 4), Residual()), None), (MaxPool(), (1, 6, 6)), (Branchy(), None)],
    ids=["residual", "residual-in-sequential", "maxpool", "concat"],
)
def test_graphs_are_lowered_exactly(model, shape):
    """Residual additions, max pooling and concatenation go through lipsdp.graph: the same function."""
    model = model.double().eval()
    net = load_network(model, **({} if shape is None else {"input_shape": shape}))
    x = np.random.default_rng(2).standard_normal((16, net.sizes[0]))
    with torch.no_grad():
        expected = model(torch.from_numpy(x).reshape(16, *(shape or (net.sizes[0],)))).reshape(16, -1).numpy()
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "model,shape,match",
    [
        (Gated(), None, (r"node 'mul' \(aten\.mul\.Tensor\) combines computed tensors \(linear, sigmoid\); a "
                         r"product of two computed tensors is not an affine map")),
        (PoolIndices(), (1, 6, 6), r"reads the indices of the maxima"),
        (BatchCat(), None, r"'cat' \(aten\.cat\.default\) concatenates along the batch axis"),
        (DataDependent(), None, r"torch\.export could not trace DataDependent.*data-dependent control flow"),
        (TwoOutputs(), None, r"the model returns 2 values"),
        (Gelu(), None, r"'gelu' \(aten\.gelu\.default\) is not supported \(GELU is not monotone"),
        (MaxPool(), None, r"pass input_shape=\(C, H, W\)"),
    ],
    ids=["product", "pool-indices", "batch-cat", "control-flow", "two-outputs", "gelu", "no-shape"],
)
def test_unsupported_graphs_are_refused_naming_the_node(model, shape, match):
    with pytest.raises(ModelLoadError, match=match):
        load_network(model, **({} if shape is None else {"input_shape": shape}))


def test_training_mode_module_is_exported_in_eval_mode_and_restored():
    model = CustomCNN().train()
    net = load_network(model, input_shape=(2, 6, 6))
    assert model.training  # left as it was
    x = np.random.default_rng(5).uniform(0, 1, (3, 72))
    np.testing.assert_allclose(net.forward(x), torch_forward(CustomCNN(), x, (2, 6, 6)), rtol=1e-10, atol=1e-12)


def _rewrite(src, dst, change) -> None:
    """Copy a zip archive, passing each member's (name, bytes) through `change`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            name, data = change(item.filename, zin.read(item.filename))
            if name is not None:
                zout.writestr(name, data)


def test_pt2_archives_that_would_unpickle_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3),)), str(good))
    assert load_network(good).sizes == [3, 4, 2]

    def pickled_weight(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            data = json.dumps(config).encode()
        return name, data

    cases = {
        "pickled": (pickled_weight, "stored as a pickled or custom object"),
        "aoti": (lambda n, d: (n, d) if not n.endswith("archive_format") else (n.replace(
            "archive_format", "data/aotinductor/model/x.so"), d), "compiled AOTInductor code"),
        "legacy": (lambda n, d: (None, d) if n.endswith("archive_version") else (n, d), "torch.export.save archive"),
        "sample": (lambda n, d: (n, b"\x80\x04 not a plain tensor pickle") if "sample_inputs" in n else (n, d),
                   "sample inputs are not plain tensors"),
    }
    for label, (change, message) in cases.items():
        bad = tmp_path / f"{label}.pt2"
        _rewrite(good, bad, change)
        with pytest.raises(ModelLoadError, match=message):
            load_network(bad)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="not a torch.export archive"):
        load_network(junk)
