"""The ONNX loader: agrees with the torch loader and with onnxruntime; clear errors otherwise."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp import ModelLoadError, UnsupportedLayerError, load_network

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def export(model: nn.Module, shape: tuple[int, ...], path) -> None:
    """torch -> ONNX with the TorchScript exporter (needs no extra packages), dynamic batch dimension."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.float().eval(), torch.zeros((1, *shape)), str(path), dynamo=False, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )


def run_ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def save_graph(path, nodes, inputs_shape, output_name, initializers) -> None:
    """Write a hand-built single-input graph (float32, opset 17)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *inputs_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", "out"])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name=k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 2))


def cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, dilation=2), nn.ELU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 3), nn.LeakyReLU(0.05), nn.Linear(3, 2), nn.Sigmoid(),
        nn.Linear(2, 2), nn.Softplus(), nn.Linear(2, 2),
    )


@pytest.mark.parametrize("builder,shape", [(mlp, (3,)), (cnn, (1, 8, 8))], ids=["mlp", "cnn"])
def test_onnx_export_matches_torch_and_onnxruntime(tmp_path, builder, shape):
    model = builder().float().eval()
    path = tmp_path / "model.onnx"
    export(model, shape, path)
    from_onnx = load_network(path)
    from_torch = load_network(model, input_shape=shape)
    assert from_onnx.sizes == from_torch.sizes
    assert [a.label() for a in from_onnx.activations] == [a.label() for a in from_torch.activations]
    for a, b in zip(from_onnx.weights + from_onnx.biases, from_torch.weights + from_torch.biases):
        np.testing.assert_array_equal(a, b)  # the same float32 numbers, read exactly
    x = RNG.standard_normal((16, *shape))
    np.testing.assert_allclose(from_onnx.forward(x.reshape(16, -1)), run_ort(path, x), rtol=1e-5, atol=1e-5)
    method = "neuron" if from_onnx.n_neurons <= 60 else "sequential"
    onnx_bound = lipsdp.estimate(path, method).upper
    torch_bound = lipsdp.estimate(model, method, input_shape=shape).upper
    assert onnx_bound == pytest.approx(torch_bound, rel=1e-12)


def test_gemm_attributes_and_matmul_add(tmp_path):
    w1 = RNG.standard_normal((4, 5))  # Gemm B with transB=0: (in, out)
    c1 = RNG.standard_normal(5)
    w2 = RNG.standard_normal((3, 5))  # Gemm B with transB=1: (out, in)
    w3 = RNG.standard_normal((3, 2))  # MatMul: (in, out)
    b3 = RNG.standard_normal(2)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["h1"], alpha=2.0, beta=0.5),
        helper.make_node("LeakyRelu", ["h1"], ["a1"], alpha=0.2),
        helper.make_node("Gemm", ["a1", "w2"], ["h2"], transB=1),
        helper.make_node("Elu", ["h2"], ["a2"], alpha=0.7),
        helper.make_node("MatMul", ["a2", "w3"], ["h3"]),
        helper.make_node("Add", ["h3", "b3"], ["y"]),
    ]
    path = tmp_path / "gemm.onnx"
    save_graph(path, nodes, [4], "y", {"w1": w1, "c1": c1, "w2": w2, "w3": w3, "b3": b3})
    net = load_network(path)
    assert net.sizes == [4, 5, 3, 2]
    assert [a.label() for a in net.activations] == ["leaky_relu(0.2)", "elu(0.7)"]
    np.testing.assert_allclose(net.weights[0], 2.0 * w1.astype(np.float32).T, rtol=1e-7)
    x = RNG.standard_normal((10, 4))
    np.testing.assert_allclose(net.forward(x), run_ort(path, x), rtol=1e-5, atol=1e-5)


def test_batchnorm_normalisation_pooling_and_reshape(tmp_path):
    """Sub/Div input normalisation, Conv (SAME_UPPER) + BatchNormalization, AveragePool with asymmetric
    padding, GlobalAveragePool, Reshape, BatchNormalization after an activation (folds into the next Gemm)."""
    conv = RNG.standard_normal((4, 2, 3, 3))
    init = {
        "mean": RNG.standard_normal((1, 2, 1, 1)),
        "std": RNG.uniform(0.5, 2.0, (1, 2, 1, 1)),
        "conv": conv,
        "conv_b": RNG.standard_normal(4),
        "bn_s": RNG.uniform(0.5, 1.5, 4),
        "bn_b": RNG.standard_normal(4),
        "bn_m": RNG.standard_normal(4),
        "bn_v": RNG.uniform(0.5, 2.0, 4),
        "shape": np.array([0, -1]),
        "bn2_s": RNG.uniform(0.5, 1.5, 4),
        "bn2_b": RNG.standard_normal(4),
        "bn2_m": RNG.standard_normal(4),
        "bn2_v": RNG.uniform(0.5, 2.0, 4),
        "w": RNG.standard_normal((3, 4)),
    }
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["n1"]),
        helper.make_node("Div", ["n1", "std"], ["n2"]),
        helper.make_node("Conv", ["n2", "conv", "conv_b"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], pads=[1, 0, 0, 1]),
        helper.make_node("Tanh", ["p"], ["t"]),
        helper.make_node("GlobalAveragePool", ["t"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["f"]),
        helper.make_node("Sigmoid", ["f"], ["s"]),
        helper.make_node("Identity", ["s"], ["i"]),
        helper.make_node("BatchNormalization", ["i", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["bn2"]),
        helper.make_node("Gemm", ["bn2", "w"], ["y"], transB=1),
    ]
    path = tmp_path / "bn.onnx"
    init["shape"] = init["shape"].astype(np.int64)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "out"])],
        [numpy_helper.from_array(v if k == "shape" else v.astype(np.float32), name=k) for k, v in init.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    net = load_network(path)
    # normalisation + conv + batch-norm: one layer; pooling: one layer; GAP/reshape/sigmoid; BN + Gemm: one.
    assert net.sizes == [98, 64, 64, 4, 3]  # 7x7 -> 4x4 (SAME, stride 2) -> 4x4 (pool stride 1)
    x = RNG.standard_normal((12, 2, 7, 7))
    np.testing.assert_allclose(net.forward(x.reshape(12, -1)), run_ort(path, x), rtol=1e-5, atol=1e-5)


def test_unsupported_op_names_the_node(tmp_path):
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Softmax", ["r"], ["y"], name="probabilities"),
    ]
    path = tmp_path / "softmax.onnx"
    save_graph(path, nodes, [3], "y", {"w": RNG.standard_normal((4, 3))})
    with pytest.raises(UnsupportedLayerError, match=r"'probabilities' \(Softmax\) is not supported.*Gemm, MatMul"):
        load_network(path)


def test_maxpool_indices_are_refused(tmp_path):
    """MaxPool is read (lipsdp.graph); the indices of the maxima are not a Lipschitz function of the input."""
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"]),
        helper.make_node("MaxPool", ["c"], ["y", "i"], kernel_shape=[2, 2], name="pool"),
        helper.make_node("Cast", ["i"], ["f"], to=1),
        helper.make_node("Add", ["y", "f"], ["z"]),
    ]
    path = tmp_path / "maxpool.onnx"
    save_graph(path, nodes, [1, 6, 6], "z", {"k": RNG.standard_normal((2, 1, 3, 3))})
    with pytest.raises(UnsupportedLayerError, match=r"'pool' \(MaxPool\): its extra outputs \['i'\] are used"):
        load_network(path)


def test_residual_graph_is_lowered(tmp_path):
    """relu(W x) + x: the skip connection is carried by pass-through neurons (lipsdp.graph)."""
    w = RNG.standard_normal((3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["y"], name="skip"),
    ]
    path = tmp_path / "residual.onnx"
    save_graph(path, nodes, [3], "y", {"w": w})
    net = load_network(path)
    x = RNG.standard_normal((20, 3))
    np.testing.assert_allclose(net.forward(x), np.maximum(x @ w.astype(np.float64).T, 0) + x, rtol=1e-12, atol=1e-12)


def test_two_outputs_are_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "out"]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", "out"])],
        [numpy_helper.from_array(RNG.standard_normal((3, 3)).astype(np.float32), name="w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedLayerError, match="2 outputs"):
        load_network(path)


@pytest.mark.parametrize("content", [b"", b"this is not an onnx file at all" * 10, bytes(range(256)) * 8])
def test_corrupt_onnx_file(tmp_path, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="broken.onnx"):
        load_network(path)


def test_symbolic_input_needs_input_shape(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "k"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "h", "w"])],
        [numpy_helper.from_array(RNG.standard_normal((1, 1, 2, 2)).astype(np.float32), name="k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "symbolic.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="input_shape"):
        load_network(path)
    net = load_network(path, input_shape=(1, 4, 4))
    assert net.sizes == [16, 9]
    x = RNG.standard_normal((3, 1, 4, 4))
    np.testing.assert_allclose(net.forward(x.reshape(3, -1)), run_ort(path, x).reshape(3, -1), rtol=1e-5, atol=1e-5)
