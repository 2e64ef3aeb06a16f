"""ONNX front end on real and exporter-shaped graphs: gzip, external data, shape computations, NHWC
transposes, squeeze/unsqueeze, batch-of-one input shapes; every network checked against onnxruntime."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp import ModelLoadError, UnsupportedLayerError, load_network

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

REALNETS = Path(__file__).resolve().parents[2] / "shared" / "realnets"
needs_realnets = pytest.mark.skipif(not REALNETS.is_dir(), reason="../shared/realnets is not available")
RNG = np.random.default_rng(7)
ort.set_default_logger_severity(3)


def session(model_or_path) -> ort.InferenceSession:
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def check_against_ort(net, sess, shape, count=16, low=-1.0, high=1.0) -> float:
    """Max |Network.forward - onnxruntime| over random inputs, one sample at a time; asserts 1e-5."""
    worst = 0.0
    for _ in range(count):
        x = RNG.uniform(low, high, (1, *shape)).astype(np.float32)
        expected = run(sess, x).reshape(-1).astype(np.float64)
        got = net.forward(x.reshape(-1).astype(np.float64))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


def save(graph_nodes, inputs, outputs, initializers, path, opset=17):
    graph = helper.make_graph(
        graph_nodes, "g", inputs, outputs,
        [numpy_helper.from_array(np.asarray(v), name=k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return model


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# -- real networks ------------------------------------------------------------------------------------
ORT_NETS = ["mnist-net_256x2.onnx", "mnist-net_256x4.onnx", "quad_controller_3_64_torch.onnx", "robot.onnx.gz",
            "mlp_L5_W32.onnx"]


@needs_realnets
@pytest.mark.parametrize("name", ORT_NETS)
def test_real_networks_match_onnxruntime(name):
    path = REALNETS / "fc" / name
    net = load_network(path)
    if name.endswith(".gz"):
        sess = ort.InferenceSession(gzip.decompress(path.read_bytes()), providers=["CPUExecutionProvider"])
    else:
        sess = session(path)
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape][1:]
    check_against_ort(net, sess, shape, low=0.0 if "mnist" in name or "mlp" in name else -1.0)


@needs_realnets
@pytest.mark.parametrize(
    "onnx_name,npz_name",
    [("robot.onnx.gz", "vnncomp22_rpd_robot.npz"), ("mnist-net_256x2.onnx", "mnistfc_256x2.npz"),
     ("mnist-net_256x4.onnx", "mnistfc_256x4.npz"), ("quad_controller_3_64_torch.onnx", "arch_quad_sigmoid.npz")],
)
def test_real_networks_equal_their_verified_conversions(onnx_name, npz_name):
    """The .npz files beside them were converted and checked independently: the same numbers, exactly."""
    ours, ref = load_network(REALNETS / "fc" / onnx_name), load_network(REALNETS / "fc" / npz_name)
    assert ours.sizes == ref.sizes
    assert [a.label() for a in ours.activations] == [a.label() for a in ref.activations]
    for a, b in zip(ours.weights + ours.biases, ref.weights + ref.biases):
        np.testing.assert_array_equal(a, b)


@needs_realnets
def test_external_data_and_shape_computations_read_as_a_chain():
    """mlp_L5_W32: weights in mlp_L5_W32.onnx.data, Shape -> Concat -> Reshape on the input, and spectral
    normalisation W / (u^T W v) computed from constants in the graph."""
    path = REALNETS / "fc" / "mlp_L5_W32.onnx"
    net = load_network(path)
    assert net.sizes == [784, 32, 32, 32, 32, 32, 10]
    assert {a.label() for a in net.activations} == {"leaky_relu(0.01)"}
    raw = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in raw.graph.initializer}
    w = init["net.1.linear.parametrizations.weight.original"]
    folded = w / (init["clone"] @ (w @ init["clone_1"]))  # float32, as onnxruntime computes it
    scale = float(init["val_5"])
    np.testing.assert_allclose(net.weights[0], scale * folded.astype(np.float64), rtol=1e-6)


@needs_realnets
def test_matlab_controller_with_a_rank_four_input():
    """controller_5_20 (MATLAB export, opset 6): input (1, 1, 1, 5), Sub of a mean image, Gemm on it.
    onnxruntime refuses Gemm on a rank-4 tensor, so the reference is the same graph with a Flatten inserted."""
    path = REALNETS / "fc" / "controller_5_20.onnx"
    net = load_network(path)
    assert net.sizes == [5, 20, 20, 20, 20, 20, 1]
    model = onnx.load(str(path))
    graph = model.graph
    graph.node[1].input[0] = "flat"
    graph.node.insert(1, helper.make_node("Flatten", ["input_Sub"], ["flat"], axis=1))
    for node in graph.node:  # opset 7: broadcasting is implicit (onnxruntime has no Sub-6 kernel)
        kept = [a for a in node.attribute if a.name != "broadcast"]
        del node.attribute[:]
        node.attribute.extend(kept)
    model.opset_import[0].version = 7
    check_against_ort(net, session(model), (1, 1, 5))


@needs_realnets
def test_cifar_cnn_matches_onnxruntime():
    path = REALNETS / "cnn" / "cifar_base_kw.onnx"
    net = load_network(path)
    assert net.sizes == [3072, 2048, 1024, 100, 10]
    check_against_ort(net, session(path), (3, 32, 32), count=4)


@needs_realnets
def test_residual_and_maxpool_cnns_match_onnxruntime():
    """resnet_2b (two residual blocks) and Convnet_maxpool (4x4 max pooling) through lipsdp.graph."""
    for name, shape in (("resnet_2b.onnx", (3, 32, 32)), ("Convnet_maxpool.onnx", (1, 28, 28))):
        path = REALNETS / "cnn" / name
        check_against_ort(load_network(path), session(path), shape, count=4, low=0.0)


# -- exporter-shaped graphs -----------------------------------------------------------------------------
class ViewNet(nn.Module):
    """A custom module whose forward flattens with x.view(x.size(0), -1): Shape/Gather/Concat/Reshape in ONNX."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc1 = nn.Linear(3 * 5 * 5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x.view(x.size(0), -1)
        return self.fc2(torch.tanh(self.fc1(x)))


def export_view_net(path: Path, **kwargs) -> nn.Module:
    model = ViewNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 2, 5, 5), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, **kwargs)
    return model


def test_shape_subgraph_gzip_and_external_data(tmp_path):
    path = tmp_path / "view.onnx"
    model = export_view_net(path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Shape" in ops and "Reshape" in ops  # the graph looks branched: x feeds Shape and Conv's output two nodes
    net = load_network(path)
    assert net.sizes == [50, 75, 8, 3]
    check_against_ort(net, session(path), (2, 5, 5))
    with torch.no_grad():
        x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
        np.testing.assert_allclose(net.forward(x.reshape(4, -1).numpy()), model.double()(x).numpy(), rtol=1e-10,
                                   atol=1e-12)
    # gzip-compressed: the same network.
    gz = tmp_path / "view.onnx.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    same = load_network(gz)
    for a, b in zip(same.weights + same.biases, net.weights + net.biases):
        np.testing.assert_array_equal(a, b)
    # External data beside the model.
    loaded = onnx.load(str(path))
    ext = tmp_path / "ext" / "view_ext.onnx"
    ext.parent.mkdir()
    onnx.save_model(loaded, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="view_ext.onnx.data", size_threshold=0)
    assert (ext.parent / "view_ext.onnx.data").stat().st_size > 1000
    external = load_network(ext)
    for a, b in zip(external.weights + external.biases, net.weights + net.biases):
        np.testing.assert_array_equal(a, b)
    assert lipsdp.estimate(ext, "sequential").upper == lipsdp.estimate(path, "sequential").upper


def test_external_data_must_sit_beside_the_model(tmp_path):
    path = tmp_path / "view.onnx"
    export_view_net(path)
    model = onnx.load(str(path))
    target = tmp_path / "sub" / "m.onnx"
    target.parent.mkdir()
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    (target.parent / "m.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(ModelLoadError, match=r"m\.onnx\.data.*copy the \.onnx file together with its external data"):
        load_network(target)
    # A location that climbs out of the model's folder is refused before anything is read.
    hostile = onnx.load(str(target), load_external_data=False)
    for tensor in hostile.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    onnx.save(hostile, str(target))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_network(target)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.onnx.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(ModelLoadError, match="broken.onnx.gz"):
        load_network(path)
    path.write_bytes(gzip.compress(b"not a protobuf at all" * 10))
    with pytest.raises(ModelLoadError, match="broken.onnx.gz"):
        load_network(path)


def test_keras_style_channels_last_transposes_fold_into_the_weights(tmp_path):
    """NHWC input -> Transpose -> Conv -> Relu -> Transpose back -> Flatten -> Gemm (Keras' Flatten of a
    channels-last map), then a final Transpose of a (1, 2, 3) output: the permutations fold into the dense
    weights, no extra layers appear, and the outputs match onnxruntime."""
    h, w, c = 4, 5, 2
    init = {"k": f32(3, c, 3, 3), "kb": f32(3), "w1": f32(h * w * 3, 6), "b1": f32(6), "w2": f32(6, 6),
            "shape": np.array([1, 2, 3], dtype=np.int64)}
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "k", "kb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["nhwc"], ["f"]),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["g"]),
        helper.make_node("Tanh", ["g"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["m3"]),
        helper.make_node("Transpose", ["m3"], ["y"], perm=[0, 2, 1]),
    ]
    path = tmp_path / "keras.onnx"
    save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", h, w, c])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2])], init, path)
    net = load_network(path)
    assert net.sizes == [h * w * c, h * w * 3, 6, 6]
    check_against_ort(net, session(path), (h, w, c))


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_cast_identity_dropout_are_no_ops(tmp_path, opset):
    """(1, 1, 5) inputs squeezed and unsqueezed around Gemms; axes as attribute (opset 11) or input (13)."""
    init = {"w1": f32(7, 5), "w2": f32(2, 7)}
    if opset >= 13:
        init.update(a1=np.array([1], dtype=np.int64), a0=np.array([0], dtype=np.int64))
        squeeze = helper.make_node("Squeeze", ["x", "a1"], ["s"])
        unsqueeze = helper.make_node("Unsqueeze", ["h", "a0"], ["u"])
        squeeze2 = helper.make_node("Squeeze", ["u", "a0"], ["v"])
    else:
        squeeze = helper.make_node("Squeeze", ["x"], ["s"], axes=[1])
        unsqueeze = helper.make_node("Unsqueeze", ["h"], ["u"], axes=[0])
        squeeze2 = helper.make_node("Squeeze", ["u"], ["v"], axes=[0])
    nodes = [
        squeeze,
        helper.make_node("Gemm", ["s", "w1"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["h"]),
        unsqueeze,
        squeeze2,
        helper.make_node("Cast", ["v"], ["cv"], to=TensorProto.FLOAT),
        helper.make_node("Identity", ["cv"], ["i"]),
        helper.make_node("Dropout", ["i"], ["d"]),
        helper.make_node("Gemm", ["d", "w2"], ["y"], transB=1),
    ]
    path = tmp_path / "squeeze.onnx"
    save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], init, path, opset=opset)
    net = load_network(path)
    assert net.sizes == [5, 7, 2]
    check_against_ort(net, session(path), (1, 5))


def test_matmul_over_rows_is_block_diagonal(tmp_path):
    """(1, 3, 4) @ (4, 2) acts on each of the 3 rows; then Flatten and a Gemm."""
    init = {"w": f32(4, 2), "v": f32(6, 2)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("Gemm", ["f", "v"], ["y"]),
    ]
    path = tmp_path / "rows.onnx"
    save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], init, path)
    net = load_network(path)
    assert net.sizes == [12, 6, 2]
    check_against_ort(net, session(path), (3, 4))


def test_concat_of_branches_matches_onnxruntime(tmp_path):
    init = {"w": f32(3, 3), "v": f32(3, 3)}
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["a"], transB=1),
        helper.make_node("Gemm", ["x", "v"], ["b"], transB=1),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Concat", ["a", "r"], ["y"], axis=1, name="join"),
    ]
    path = tmp_path / "concat.onnx"
    save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], init, path)
    check_against_ort(load_network(path), session(path), (3,))


def test_product_of_branches_is_refused_with_the_node_name(tmp_path):
    init = {"w": f32(3, 3), "v": f32(3, 3)}
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["a"], transB=1),
        helper.make_node("Gemm", ["x", "v"], ["b"], transB=1),
        helper.make_node("Mul", ["a", "b"], ["y"], name="gate"),
    ]
    path = tmp_path / "product.onnx"
    save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], init, path)
    with pytest.raises(UnsupportedLayerError, match=r"'gate' \(Mul\) combines the computed tensors \['a', 'b'\] "
                       r"\(a product of two computed tensors is not an affine map\)"):
        load_network(path)
