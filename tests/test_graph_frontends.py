"""Graph front ends (ONNX and torch.export -> lipsdp.graph -> Network): residual sums, concatenations, max
pooling and padding, each checked against an independent evaluation (onnxruntime, torch); one model read
three ways (module, exported program, ONNX export) gives the same bounds; real residual and max-pooling
CNNs from VNN-COMP load, match onnxruntime and get verified bounds."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipsdp
from lipsdp import UnsupportedLayerError, load_network
from lipsdp.io.torch_export import from_exported

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

REALNETS = Path(__file__).resolve().parents[2] / "shared" / "realnets"
needs_realnets = pytest.mark.skipif(not REALNETS.is_dir(), reason="../shared/realnets is not available")
RNG = np.random.default_rng(11)
ort.set_default_logger_severity(3)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def save(path, nodes, in_shape, out_name, init, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), name=k) for k, v in init.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    try:  # the output's type from shape inference (the checker needs one)
        inferred = onnx.shape_inference.infer_shapes(model)
        found = [v for v in list(inferred.graph.value_info) + list(inferred.graph.output) if v.name == out_name]
        if found and found[0].type.tensor_type.HasField("shape"):
            model.graph.output[0].CopyFrom(found[0])
    except Exception:  # noqa: BLE001, S110 - an invalid graph is what some tests want
        pass
    if not model.graph.output[0].type.tensor_type.HasField("shape"):
        model.graph.output[0].type.tensor_type.shape.dim.add().dim_param = "N"
    onnx.save(model, str(path))
    return path


def max_error_vs_ort(path, shape, count=8) -> float:
    """Max |Network.forward - onnxruntime| over random inputs; asserts 1e-5 (absolute and relative)."""
    net = load_network(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for _ in range(count):
        x = RNG.uniform(-1, 1, (1, *shape)).astype(np.float32)
        expected = sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(-1).astype(np.float64)
        got = net.forward(x.reshape(-1).astype(np.float64))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


# -- ONNX graphs against onnxruntime --------------------------------------------------------------------
def test_onnx_residual_block_with_transposes_and_a_subtraction(tmp_path):
    """A skip around two convs, a Sub of two branches, a Sum with a constant, NHWC transposes on one branch."""
    nodes = [
        helper.make_node("Conv", ["x", "k1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "x"], ["s"], name="skip"),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Transpose", ["r2"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["x"], ["tx"], perm=[0, 2, 3, 1]),
        helper.make_node("Sub", ["t", "tx"], ["d"]),
        helper.make_node("Sum", ["d", "t", "shift"], ["e"]),
        helper.make_node("Flatten", ["e"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    init = {"k1": f32(2, 2, 3, 3), "b1": f32(2), "k2": f32(2, 2, 3, 3), "shift": f32(1, 1, 1, 2), "w": f32(3, 32)}
    path = save(tmp_path / "res.onnx", nodes, (2, 4, 4), "y", init)
    max_error_vs_ort(path, (2, 4, 4))


def test_onnx_sum_of_one_computed_tensor_and_constants(tmp_path):
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
        helper.make_node("Sum", ["h", "c1", "c2"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    path = save(tmp_path / "sum.onnx", nodes, (3,), "y", {"w": f32(4, 3), "c1": f32(4), "c2": f32(1, 4)})
    max_error_vs_ort(path, (3,))


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "strides": [1, 1]},  # overlapping windows
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},  # -inf padding
        {"kernel_shape": [2, 3], "strides": [1, 2], "pads": [0, 1, 1, 0], "dilations": [2, 1]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
        {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},  # exact fit: ceil = floor
    ],
)
def test_onnx_maxpool_matches_onnxruntime(tmp_path, attrs):
    nodes = [
        helper.make_node("Conv", ["x", "k", "b"], ["c"]),
        helper.make_node("MaxPool", ["c"], ["p"], **attrs),
        helper.make_node("Relu", ["p"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]
    sess_shape = _maxpool_out(attrs)
    init = {"k": f32(3, 2, 2, 2), "b": f32(3), "w": f32(3 * sess_shape, 2)}
    path = save(tmp_path / "pool.onnx", nodes, (2, 7, 7), "y", init)
    max_error_vs_ort(path, (2, 7, 7))


def _maxpool_out(attrs) -> int:
    """Entries per channel of the pooled 6x6 map (from onnxruntime itself, so the test does not assume it)."""
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return int(sess.run(None, {"x": np.zeros((1, 1, 6, 6), np.float32)})[0].size)


def test_onnx_global_maxpool_after_a_relu_and_maxpool_of_the_input(tmp_path):
    nodes = [
        helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[2, 2]),
        helper.make_node("Conv", ["m", "k"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalMaxPool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    path = save(tmp_path / "gmp.onnx", nodes, (2, 5, 5), "y", {"k": f32(4, 2, 2, 2)})
    max_error_vs_ort(path, (2, 5, 5))
    assert load_network(path).depth >= 3  # two tournaments of 16 and 9 entries: ceil(log2) levels each


@pytest.mark.parametrize(
    "mode,pads,value",
    [("constant", [0, 0, 1, 2, 0, 0, 0, 1], 0.0), ("constant", [0, 1, 2, 0, 0, 0, 1, 1], -0.75),
     ("edge", [0, 0, 2, 1, 0, 0, 1, 2], None), ("reflect", [0, 0, 1, 2, 0, 0, 2, 1], None),
     ("wrap", [0, 0, 1, 1, 0, 0, 1, 1], None), ("constant", [0, 0, -1, 1, 0, 0, 1, -1], 0.0)],
    ids=["zero", "constant-channels", "edge", "reflect", "wrap", "crop"],
)
def test_onnx_pad_matches_onnxruntime(tmp_path, mode, pads, value):
    init = {"pads": np.array(pads, dtype=np.int64), "k": f32(2, 3 if pads[1] else 2, 2, 2)}
    inputs = ["x", "pads"]
    if value is not None:
        init["v"] = np.array(value, dtype=np.float32)
        inputs.append("v")
    nodes = [
        helper.make_node("Pad", inputs, ["p"], mode=mode, name="pad"),
        helper.make_node("Conv", ["p", "k"], ["c"]),
        helper.make_node("Tanh", ["c"], ["y"]),
    ]
    path = save(tmp_path / "pad.onnx", nodes, (2, 4, 5), "y", init, opset=19)
    max_error_vs_ort(path, (2, 4, 5))


def test_onnx_concat_with_a_constant_and_a_permuted_branch(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Conv", ["t", "k"], ["u"]),
        helper.make_node("Concat", ["r", "const", "u"], ["cat"], axis=1),
        helper.make_node("Concat", ["cat", "cat"], ["cat2"], axis=-1),
        helper.make_node("Flatten", ["cat2"], ["y"]),
    ]
    path = save(tmp_path / "cat.onnx", nodes, (1, 4, 4), "y", {"k": f32(2, 1, 2, 2), "const": f32(1, 1, 3, 3)})
    max_error_vs_ort(path, (1, 4, 4))


@pytest.mark.parametrize(
    "nodes,match",
    [
        ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, name="p")],
         r"'p' \(MaxPool\): ceil_mode=1 with partial windows"),
        ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2], name="p")], r"'p' \(MaxPool\): .*2-D"),
        ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["x", "r"], ["y"], name="m")],
         r"'m' \(Mul\) combines the computed tensors \['x', 'r'\]"),
        ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["x", "r"], ["y"], axis=0, name="c")],
         r"'c' \(Concat\) concatenates along the batch axis"),
        ([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect", name="p")], r"'p' \(Pad\): reflect padding"),
        ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Softmax", ["r"], ["s"], name="soft"),
          helper.make_node("Add", ["s", "x"], ["y"])], r"'soft' \(Softmax\) is not supported \(drop the final"),
        ([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ReduceMean", ["r"], ["m"], name="mean"),
          helper.make_node("Add", ["m", "x"], ["y"])], r"'mean' \(ReduceMean\) is not supported"),
    ],
    ids=["ceil-partial", "1-d-pool", "product", "batch-concat", "reflect-too-wide", "softmax", "reduce"],
)
def test_onnx_unsupported_graph_constructs_name_the_node(tmp_path, nodes, match):
    path = save(tmp_path / "bad.onnx", nodes, (1, 5, 5), "y", {"pads": np.array([0, 0, 5, 0, 0, 0, 0, 0])})
    with pytest.raises(UnsupportedLayerError, match=match):
        load_network(path)


# -- torch: residual blocks, max pooling and padding ----------------------------------------------------
class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.c2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.c2(F.relu(self.bn(self.c1(x)))))


class ResPoolNet(nn.Module):
    """Padding, two residual blocks, max pooling (overlapping and not), a concatenation, a sum of pools."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Conv2d(1, 3, 3)
        self.b1, self.b2 = Block(3), Block(3)
        self.fc = nn.Linear(3 * 2 * 2 + 3 * 3 * 3, 4)
        with torch.no_grad():
            for bn in (self.b1.bn, self.b2.bn):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = F.pad(x, (1, 1, 0, 2), value=0.25)
        h = self.b2(self.b1(F.relu(self.stem(x))))
        p = F.max_pool2d(h, 2)
        q = F.max_pool2d(F.pad(h, (1, 0, 1, 0), mode="replicate"), 3, stride=2, padding=1)
        return self.fc(torch.cat([p.flatten(1), q.flatten(1)], dim=1))


SHAPE = (1, 4, 5)


def test_torch_residual_pool_pad_forward_matches_torch_float64():
    model = ResPoolNet().double().eval()
    net = load_network(model, input_shape=SHAPE)
    x = np.random.default_rng(0).standard_normal((64, 20))
    with torch.no_grad():
        expected = model(torch.from_numpy(x).reshape(64, *SHAPE)).numpy()
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-10, atol=1e-10)
    assert any("identity" in a.label() for a in net.activations)  # the skips ride on pass-through neurons


def test_torch_module_export_and_onnx_export_give_the_same_bounds(tmp_path):
    """One float32 model read as a module, as its torch.export program and as its ONNX export (batch norm
    kept as a node: the exporter's constant folding would fuse it into the conv in float32): the same
    function (float32 weights are exact in float64), so the same bounds up to the rounding of products."""
    model = ResPoolNet().eval()
    example = torch.zeros((1, *SHAPE))
    path = tmp_path / "respool.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, do_constant_folding=False, input_names=["x"],
                          output_names=["y"])
    nets = {
        "module": load_network(model, input_shape=SHAPE),
        "export": from_exported(torch.export.export(model, (example,))),
        "onnx": load_network(path),
    }
    x = np.random.default_rng(1).standard_normal((16, 20))
    for net in nets.values():
        np.testing.assert_allclose(net.forward(x), nets["module"].forward(x), rtol=1e-9, atol=1e-9)
    for method in ("naive", "sequential"):
        bounds = {k: lipsdp.estimate(net, method).upper for k, net in nets.items()}
        assert bounds["export"] == pytest.approx(bounds["module"], rel=1e-9), (method, bounds)
        assert bounds["onnx"] == pytest.approx(bounds["module"], rel=1e-9), (method, bounds)
        lower = lipsdp.estimate(nets["module"], "naive", lower=True, lower_samples=64, lower_steps=10).lower
        assert lower <= min(bounds.values())


# -- real CNNs --------------------------------------------------------------------------------------------
@needs_realnets
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_2b", "Convnet_maxpool", "cifar_base_kw"])
def test_real_cnns_get_verified_naive_and_sequential_bounds(name):
    """Measured on 2 shared cores: resnet_2b ([3072, 2048, 1536, 1024, 2048, 1024, 100, 10]) naive 1286.8 in
    23 s, sequential 237.7 in about 5 min; Convnet_maxpool ([784, 9816, 9216, 4608, 2304, 1152, 10]) naive
    129036 in about 30 min (the Jacobian search another 13); cifar_base_kw (a chain) naive 20.5, sequential
    10.1 in under a minute each."""
    net = load_network(REALNETS / "cnn" / f"{name}.onnx")
    lower = lipsdp.estimate(net, "naive", lower=True, lower_samples=32, lower_steps=10)
    assert lower.verified and 0 < lower.lower <= lower.upper
    if name != "Convnet_maxpool":  # hidden layers of 9,000+ neurons: sequential takes about an hour on 2 cores
        seq = lipsdp.estimate(net, "sequential")
        assert seq.verified and lower.lower <= seq.upper <= lower.upper * (1 + 1e-9)


@needs_realnets
@pytest.mark.slow
def test_cli_certifies_resnet_vnnlib_properties_with_naive_bounds():
    from typer.testing import CliRunner

    from lipsdp.cli import app

    props = sorted(str(p) for p in (REALNETS / "vnnlib" / "resnet2b").glob("*.vnnlib"))[:1]  # 9 pair bounds
    out = CliRunner().invoke(app, ["certify", str(REALNETS / "cnn" / "resnet_2b.onnx"), *props, "--method", "naive",
                                   "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert len(re.findall(r"vnnlib", json.dumps(data))) >= len(props)


def test_certificate_for_an_onnx_residual_graph_is_re_proved(tmp_path):
    """The verifier reloads the ONNX file (lowered again, the same sha256) and re-proves the bound with the
    pass-through neurons' slope 1 and the max pool's relu slopes [0, 1]."""
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["s"]),
        helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    path = save(tmp_path / "res.onnx", nodes, (1, 4, 4), "y", {"k": f32(1, 1, 3, 3), "w": f32(2, 4)})
    for method in ("naive", "sequential", "neuron"):
        res = lipsdp.estimate(path, method)
        res.save_certificate(tmp_path / f"{method}.cert.json")
        check = lipsdp.verify(tmp_path / f"{method}.cert.json", path)
        assert check.accepted, (method, check.reason)
