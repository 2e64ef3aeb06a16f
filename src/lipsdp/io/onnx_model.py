"""ONNX files -> Network: a chain graph of affine operations and elementwise activations.

Affine: Gemm, MatMul (weight as second input), Add/Sub/Mul/Div by a constant, Conv and AveragePool /
GlobalAveragePool (unrolled to matrices with the input shape of the graph), BatchNormalization (folded
into the neighbouring affine map), Flatten / Reshape (the flat vector is unchanged in C order), Identity,
Dropout. Activations: Relu, LeakyRelu, Tanh, Sigmoid, Elu, Softplus. Anything else, or a graph that
branches, raises an error naming the node.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lipsdp.activations import activation
from lipsdp.errors import ModelLoadError, UnsupportedLayerError
from lipsdp.io.chain import ChainBuilder
from lipsdp.io.unroll import avgpool2d_matrix, conv2d_matrix, conv_output_size, same_padding
from lipsdp.network import Network

SUPPORTED_OPS = (
    "Gemm, MatMul, Add, Sub, Mul, Div (by constants), Conv, AveragePool, GlobalAveragePool, "
    "BatchNormalization, Flatten, Reshape, Identity, Dropout, Relu, LeakyRelu, Tanh, Sigmoid, Elu, Softplus"
)
_ACTIVATIONS = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softplus": "softplus"}


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _describe(node: Any, index: int) -> str:
    return f"node {index} '{node.name or node.output[0]}' ({node.op_type})"


class _OnnxChain:
    """Walks the nodes of a chain graph, tracking the per-sample shape, and feeds a ChainBuilder."""

    def __init__(self, path: Path, graph: Any, input_shape: tuple[int, ...] | None) -> None:
        from onnx import numpy_helper

        self.path = path
        self.builder = ChainBuilder(str(path))
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise UnsupportedLayerError(
                f"{path}: the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); lipsdp reads "
                "single-input chain graphs"
            )
        if len(graph.output) != 1:
            raise UnsupportedLayerError(
                f"{path}: the graph has {len(graph.output)} outputs ({', '.join(o.name for o in graph.output)}); "
                "lipsdp reads chain graphs with one output"
            )
        self.current = inputs[0].name
        self.output = graph.output[0].name
        self.batched, self.shape = self._input_shape(inputs[0], input_shape)
        self.builder.size = math.prod(self.shape)

    def _input_shape(self, value: Any, given: tuple[int, ...] | None) -> tuple[bool, tuple[int, ...]]:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if not dims:
            if given is None:
                raise ModelLoadError(f"{self.path}: the graph input has no declared shape; pass input_shape")
            return True, tuple(int(v) for v in given)
        batched = len(dims) >= 2
        sample = dims[1:] if batched else dims
        if given is not None:
            given = tuple(int(v) for v in given)
            if len(given) != len(sample) or any(d is not None and d != g for d, g in zip(sample, given)):
                raise ModelLoadError(
                    f"{self.path}: input_shape {given} does not match the graph's input shape {tuple(sample)} "
                    "(per sample, without the batch dimension)"
                )
            return batched, given
        if any(d is None or d < 1 for d in sample):
            raise ModelLoadError(
                f"{self.path}: the graph input has symbolic sizes {tuple(sample)} besides the batch dimension; "
                "pass input_shape=(C, H, W)"
            )
        return batched, tuple(sample)

    # -- helpers --------------------------------------------------------------------------------
    def const(self, name: str, where: str) -> np.ndarray:
        if name not in self.consts:
            raise UnsupportedLayerError(f"{where}: input '{name}' must be a constant (initializer)")
        return np.asarray(self.consts[name], dtype=np.float64)

    def image(self, where: str) -> tuple[int, int, int]:
        if len(self.shape) != 3:
            raise UnsupportedLayerError(f"{where}: needs an (N, C, H, W) input, but the tensor has per-sample shape {self.shape}")
        return self.shape  # type: ignore[return-value]

    def broadcast(self, value: np.ndarray, where: str) -> np.ndarray:
        """A constant broadcast against one sample, flattened (refuses constants that would grow the tensor)."""
        full = ((1,) if self.batched else ()) + self.shape
        try:
            out = np.broadcast_to(value, full)
        except ValueError:
            raise UnsupportedLayerError(
                f"{where}: constant of shape {value.shape} does not broadcast to the input shape {full}"
            ) from None
        if np.broadcast_shapes(value.shape, full) != full:
            raise UnsupportedLayerError(f"{where}: constant of shape {value.shape} would change the shape {full}")
        return out.reshape(-1).astype(np.float64)

    # -- operations -----------------------------------------------------------------------------
    def add(self, index: int, node: Any, data: list[str]) -> None:
        op, where, attrs = node.op_type, _describe(node, index), _attributes(node)
        b = self.builder
        if op == "Gemm":
            if data != [node.input[0]] or attrs.get("transA", 0):
                raise UnsupportedLayerError(f"{where}: the data must be the first input A with transA=0")
            weight = self.const(node.input[1], where)
            weight = weight if attrs.get("transB", 0) else weight.T
            weight = float(attrs.get("alpha", 1.0)) * weight
            bias = None
            if len(node.input) > 2 and node.input[2]:
                c = self.const(node.input[2], where)
                if c.size not in (1, weight.shape[0]):
                    raise UnsupportedLayerError(f"{where}: bias C of shape {c.shape} is not per output feature")
                bias = float(attrs.get("beta", 1.0)) * np.broadcast_to(c.reshape(-1), (weight.shape[0],))
            self.flat(where)
            b.affine(weight, bias, where)
            self.shape = (weight.shape[0],)
        elif op == "MatMul":
            if data != [node.input[0]]:
                raise UnsupportedLayerError(f"{where}: the data must be the first input (x @ W)")
            weight = self.const(node.input[1], where)
            if weight.ndim != 2:
                raise UnsupportedLayerError(f"{where}: weight of shape {weight.shape} is not a matrix")
            self.flat(where)
            b.affine(weight.T, None, where)
            self.shape = (weight.shape[1],)
        elif op in ("Add", "Sub", "Mul", "Div"):
            self.elementwise(op, node, data, where)
        elif op == "Conv":
            self.conv(node, attrs, where)
        elif op in ("AveragePool", "GlobalAveragePool"):
            self.avgpool(node, attrs, where)
        elif op == "BatchNormalization":
            if attrs.get("training_mode", 0):
                raise UnsupportedLayerError(f"{where}: training_mode=1 is not a fixed affine map; export in eval mode")
            scale, bias, mean, var = (self.const(name, where) for name in node.input[1:5])
            factor = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
            shift = bias - mean * factor
            per_channel = math.prod(self.shape[1:])
            b.affine(np.repeat(factor, per_channel), np.repeat(shift, per_channel), where)
        elif op == "Flatten":
            if self.batched and attrs.get("axis", 1) != 1:
                raise UnsupportedLayerError(f"{where}: only axis=1 (keep the batch dimension) is supported")
            self.shape = (math.prod(self.shape),)
        elif op == "Reshape":
            self.reshape(node, where)
        elif op in ("Identity", "Dropout"):
            pass
        elif op in _ACTIVATIONS:
            b.activation(activation(_ACTIVATIONS[op]))
        elif op == "LeakyRelu":
            b.activation(activation("leaky_relu", float(attrs.get("alpha", 0.01))))
        elif op == "Elu":
            b.activation(activation("elu", float(attrs.get("alpha", 1.0))))
        else:
            raise UnsupportedLayerError(
                f"{self.path}: {where} is not supported; lipsdp reads chain graphs of {SUPPORTED_OPS}"
            )

    def flat(self, where: str) -> None:
        if len(self.shape) != 1:
            raise UnsupportedLayerError(f"{where}: receives per-sample shape {self.shape}; flatten it first")

    def elementwise(self, op: str, node: Any, data: list[str], where: str) -> None:
        first = node.input[0] == data[0]
        other = node.input[1] if first else node.input[0]
        c = self.broadcast(self.const(other, where), where)
        ones = np.ones_like(c)
        if op == "Add":
            self.builder.affine(ones, c, where)
        elif op == "Sub":
            self.builder.affine(ones if first else -ones, -c if first else c, where)
        elif op == "Mul":
            self.builder.affine(c, None, where)
        elif first:  # Div by a constant
            if np.any(c == 0):
                raise UnsupportedLayerError(f"{where}: division by zero in the constant")
            self.builder.affine(1.0 / c, None, where)
        else:
            raise UnsupportedLayerError(f"{where}: dividing a constant by the data is not an affine map")

    def _window(self, attrs: dict[str, Any], kernel: tuple[int, int], dilation: tuple[int, int], where: str):
        _, h, w = self.image(where)
        strides = tuple(attrs.get("strides", (1, 1)))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            upper = auto == "SAME_UPPER"
            (top, bottom), (left, right) = (
                same_padding(h, kernel[0], strides[0], dilation[0], upper),
                same_padding(w, kernel[1], strides[1], dilation[1], upper),
            )
            pads = (top, left, bottom, right)
        elif auto == "VALID":
            pads = (0, 0, 0, 0)
        else:
            pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
        if len(strides) != 2 or len(pads) != 4:
            raise UnsupportedLayerError(f"{where}: only 2-D windows (N, C, H, W) are supported")
        return strides, pads

    def conv(self, node: Any, attrs: dict[str, Any], where: str) -> None:
        weight = self.const(node.input[1], where)
        if weight.ndim != 4:
            raise UnsupportedLayerError(f"{where}: only 2-D convolutions are supported (kernel shape {weight.shape})")
        dilation = tuple(attrs.get("dilations", (1, 1)))
        strides, pads = self._window(attrs, weight.shape[2:], dilation, where)
        matrix, self.shape = conv2d_matrix(
            weight, self.image(where), stride=strides, padding=pads, dilation=dilation, groups=int(attrs.get("group", 1))
        )
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.repeat(self.const(node.input[2], where), self.shape[1] * self.shape[2])
        self.builder.affine(matrix, bias, where)

    def avgpool(self, node: Any, attrs: dict[str, Any], where: str) -> None:
        shape = self.image(where)
        if node.op_type == "GlobalAveragePool":
            matrix, self.shape = avgpool2d_matrix(shape, shape[1:], stride=1)
        else:
            kernel = tuple(attrs["kernel_shape"])
            strides, pads = self._window(attrs, kernel, (1, 1), where)
            if attrs.get("ceil_mode", 0):
                floor = [conv_output_size(shape[1 + i], kernel[i], strides[i], pads[i], pads[2 + i], 1) for i in (0, 1)]
                ceil = [
                    -(-(shape[1 + i] + pads[i] + pads[2 + i] - kernel[i]) // strides[i]) + 1 for i in (0, 1)
                ]
                if floor != ceil:
                    raise UnsupportedLayerError(f"{where}: ceil_mode=1 with partial windows is not supported")
            matrix, self.shape = avgpool2d_matrix(
                shape, kernel, stride=strides, padding=pads, count_include_pad=bool(attrs.get("count_include_pad", 0))
            )
        self.builder.affine(matrix, None, where)

    def reshape(self, node: Any, where: str) -> None:
        target = [int(v) for v in self.const(node.input[1], where).reshape(-1)]
        size = math.prod(self.shape)
        if self.batched:
            if not target or target[0] not in (0, -1, 1):
                raise UnsupportedLayerError(f"{where}: reshape to {target} does not keep the batch dimension first")
            full = (None,) + self.shape
            rest = [full[i + 1] if v == 0 and i + 1 < len(full) else v for i, v in enumerate(target[1:])]
            if target[0] == -1 and -1 in rest:
                raise UnsupportedLayerError(f"{where}: reshape to {target} does not keep the batch dimension first")
        else:
            rest = [self.shape[i] if v == 0 and i < len(self.shape) else v for i, v in enumerate(target)]
        known = math.prod(v for v in rest if v != -1)
        if rest.count(-1) == 1 and known > 0 and size % known == 0:
            rest = [size // known if v == -1 else v for v in rest]
        if any(v is None or v < 1 for v in rest) or math.prod(rest) != size:
            raise UnsupportedLayerError(f"{where}: reshape to {target} does not keep the per-sample size {size}")
        self.shape = tuple(rest)


def load_onnx(path: str | Path, *, input_shape: tuple[int, ...] | None = None, **_: Any) -> Network:
    """Read an ONNX chain graph into a Network (float64 copies of its weights).

    `input_shape` (per sample, no batch dimension) is needed only when the graph's input has symbolic sizes
    other than the batch dimension. Raises ModelLoadError for unreadable files and UnsupportedLayerError
    naming the node for operations or graph shapes lipsdp cannot read.
    """
    try:
        import onnx
    except ImportError:
        raise ModelLoadError("reading .onnx files needs the onnx extra: pip install 'lipsdp[onnx]'") from None
    path = Path(path)
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and checker raise many types
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"[:600]) from None
    graph = model.graph
    if not graph.node:
        raise ModelLoadError(f"{path}: the ONNX graph has no nodes")
    chain = _OnnxChain(path, graph, input_shape)
    consumers: dict[str, int] = {}
    readers: dict[str, list[str]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
            readers.setdefault(name, []).append(_describe(node, index))
    for index, node in enumerate(graph.node):
        where = _describe(node, index)
        if node.op_type == "Constant":
            from onnx import numpy_helper

            attrs = {a.name: a for a in node.attribute}
            if "value" not in attrs:
                raise UnsupportedLayerError(f"{path}: {where}: only tensor-valued Constant nodes are supported")
            chain.consts[node.output[0]] = numpy_helper.to_array(attrs["value"].t)
            continue
        data = [name for name in node.input if name and name not in chain.consts]
        if not data and node.op_type == "Identity":  # exporters alias shared weights this way
            chain.consts[node.output[0]] = chain.consts[node.input[0]]
            continue
        if not data:
            raise UnsupportedLayerError(f"{path}: {where} computes on constants only; fold constants before export")
        if len(data) > 1:
            raise UnsupportedLayerError(
                f"{path}: {where} combines computed tensors {data}: the graph branches (e.g. a residual "
                "connection); lipsdp reads chain graphs only"
            )
        if data[0] != chain.current:
            raise UnsupportedLayerError(
                f"{path}: {where} reads '{data[0]}', not the output of the previous layer: the graph is not a chain"
            )
        if consumers.get(chain.current, 0) > 1 or chain.current == chain.output:
            raise UnsupportedLayerError(
                f"{path}: tensor '{chain.current}' feeds several nodes ({', '.join(readers.get(chain.current, []))})"
                " or is also a graph output: the graph branches (e.g. a residual connection); lipsdp reads chain "
                "graphs only"
            )
        chain.add(index, node, data)
        extra = [o for o in node.output[1:] if o and consumers.get(o, 0)]
        if extra:
            raise UnsupportedLayerError(f"{path}: {where}: its extra outputs {extra} are used; the graph branches")
        chain.current = node.output[0]
    if chain.current != chain.output:
        raise UnsupportedLayerError(
            f"{path}: the graph output '{chain.output}' is not the end of the node chain ('{chain.current}')"
        )
    return chain.builder.build()
