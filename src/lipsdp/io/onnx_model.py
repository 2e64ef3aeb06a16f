"""ONNX files -> Network: a chain graph of affine operations and elementwise activations.

Files: `.onnx` and gzip-compressed `.onnx.gz`, with external tensor data beside the model. Before the
walk, `onnx_graph.prepare` fixes the batch dimension to 1, runs shape inference and folds every constant
subgraph (Constant nodes, shape computations such as Shape -> Gather -> Concat -> Reshape, weight
normalisation), so a graph that only looks branched because of them reads as the chain it is.

Affine: Gemm, MatMul (weight as second input; a batch of one, including MATLAB-style (1, 1, 1, n)
inputs), Add/Sub/Mul/Div by a constant, Conv and AveragePool / GlobalAveragePool (unrolled to matrices
with the input shape of the graph), BatchNormalization (folded into the neighbouring affine map).
Data movement: Flatten, Reshape, Squeeze, Unsqueeze (the order of the entries is unchanged), Transpose
(a permutation, e.g. from a Keras channels-last model, folded exactly into the next dense or conv
weights, see `layout.Layout`), Pad (constant, edge, reflect, wrap: an affine map), Identity, Dropout.
Activations: Relu, LeakyRelu, Tanh, Sigmoid, Elu, Softplus.

A chain graph is read by the chain walker straight into a Network. A graph that branches (a tensor read by
several nodes: residual Add / Sub / Sum of computed tensors, Concat) or that max-pools (MaxPool,
GlobalMaxPool) is read into a `lipsdp.graph.Graph` by the same operations and lowered exactly to a chain
(`lipsdp.graph.to_network`: pass-through neurons for skip connections, max(a, b) = b + relu(a - b)).
Anything else raises an error naming the node.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np

from lipsdp.activations import activation
from lipsdp.compose import lower
from lipsdp.conv import Conv2d
from lipsdp.errors import ModelLoadError, UnsupportedLayerError
from lipsdp.graph import Graph
from lipsdp.io.chain import ChainBuilder, GraphBuilder
from lipsdp.io.layout import Layout, concat_layout
from lipsdp.network import Network
from lipsdp.unroll import (
    avgpool2d_matrix,
    conv_output_size,
    maxpool2d_windows,
    pad_matrix,
    same_padding,
)

SUPPORTED_OPS = (
    "Gemm, MatMul, Add, Sub, Mul, Div (by constants), Add, Sub, Sum (of computed tensors), Concat, Conv, "
    "AveragePool, GlobalAveragePool, MaxPool, GlobalMaxPool, BatchNormalization, Pad, Flatten, Reshape, Squeeze, "
    "Unsqueeze, Transpose, Identity, Dropout, Relu, LeakyRelu, Tanh, Sigmoid, Elu, Softplus, TopK (a full sort: "
    "GroupSort), Max, Min (of two computed tensors: MaxMin), ReduceMax, ReduceMin (one axis), Gather, Slice, Split "
    "(constant indices)"
)
_ACTIVATIONS = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Softplus": "softplus"}
_HINTS = {
    "Softmax": "drop the final softmax and bound the logits (certified radii use logit margins)",
    "LogSoftmax": "drop the final log-softmax and bound the logits",
    "If": "data-dependent control flow is not a fixed graph of layers",
    "Loop": "data-dependent control flow is not a fixed graph of layers",
    "Scan": "data-dependent control flow is not a fixed graph of layers",
    "MatMul": "a product of two computed tensors (attention-like) is not an affine map",
    "Mul": "a product of two computed tensors is not an affine map",
    "Div": "a quotient of computed tensors is not an affine map",
    "Attention": "attention multiplies computed tensors; it has no global Lipschitz constant LipSDP can bound",
}
_MERGES = {"Add", "Sub", "Sum", "Concat"}  # operations that combine computed tensors in a graph
_POOLS = {"MaxPool", "GlobalMaxPool"}
# read only as a graph: sorting, extrema and taking entries (the norm-preserving activations' patterns)
_GRAPH_OPS = {"TopK", "Max", "Min", "ReduceMax", "ReduceMin", "Gather", "Slice", "Split"}
_MAX_KRON = 50_000_000  # entries of the block-diagonal matrix of a MatMul over several rows


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _describe(node: Any, index: int) -> str:
    return f"node {index} '{node.name or node.output[0]}' ({node.op_type})"


class _OnnxChain:
    """Walks the nodes of a chain graph, tracking the shape of one sample's tensor (batch 1), and feeds a ChainBuilder."""

    def __init__(self, path: Path, prepared: Any) -> None:
        self.path = path
        self.builder = ChainBuilder(str(path))
        self.consts: dict[str, np.ndarray] = dict(prepared.consts)
        graph = prepared.graph
        if len(graph.output) != 1:
            raise UnsupportedLayerError(
                f"{path}: the graph has {len(graph.output)} outputs ({', '.join(o.name for o in graph.output)}); "
                "lipsdp reads chain graphs with one output"
            )
        self.current = prepared.input_name
        self.output = graph.output[0].name
        # The data tensor for one sample (batch dimension 1), and its order relative to the flat vector.
        self.layout = Layout(prepared.input_shape)
        self.builder.size = self.layout.size

    # -- helpers --------------------------------------------------------------------------------
    def const(self, name: str, where: str) -> np.ndarray:
        if name not in self.consts:
            raise UnsupportedLayerError(f"{where}: input '{name}' must be a constant (initializer)")
        return np.asarray(self.consts[name], dtype=np.float64)

    @property
    def shape(self) -> tuple[int, ...]:
        """The data tensor's shape (batch dimension 1 included)."""
        return self.layout.shape

    def image(self, where: str) -> tuple[int, int, int]:
        if len(self.shape) != 4 or self.shape[0] != 1:
            raise UnsupportedLayerError(f"{where}: needs an (N, C, H, W) input, but the tensor has shape {self.shape}")
        return self.shape[1:]  # type: ignore[return-value]

    def dense(
        self, matrix: np.ndarray, bias: np.ndarray | None, shape: tuple[int, ...], where: str, operator: object = None
    ) -> None:
        """A dense map of the tensor (C order); its output is a fresh tensor of `shape`."""
        # the operator (e.g. a Conv2d) acts on the tensor in C order: kept only while that is the vector's order
        self.builder.affine(self.layout.columns(matrix), bias, where, operator if self.layout.index is None else None)
        self.layout.settle(shape)

    def diagonal(self, scale: np.ndarray, shift: np.ndarray | None, where: str) -> None:
        """x -> scale * x + shift entry by entry (C order of the tensor); the tensor keeps its shape and order."""
        vector = self.layout.vector
        self.builder.affine(vector(scale), None if shift is None else vector(shift), where)

    def broadcast(self, value: np.ndarray, where: str) -> np.ndarray:
        """A constant broadcast against one sample, flattened (refuses constants that would grow the tensor)."""
        full = self.shape
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
            self.dense(weight, bias, (1, weight.shape[0]), where)
        elif op == "MatMul":
            self.matmul(node, data, where)
        elif op in ("Add", "Sub", "Mul", "Div"):
            self.elementwise(op, node, data, where)
        elif op == "Conv":
            self.conv(node, attrs, where)
        elif op in ("AveragePool", "GlobalAveragePool"):
            self.avgpool(node, attrs, where)
        elif op == "BatchNormalization":
            if attrs.get("training_mode", 0):
                raise UnsupportedLayerError(f"{where}: training_mode=1 is not a fixed affine map; export in eval mode")
            if len(node.input) < 5:
                raise ModelLoadError(f"{self.path}: {where} needs inputs X, scale, B, mean, var")
            scale, bias, mean, var = (self.const(name, where).reshape(-1) for name in node.input[1:5])
            if len({scale.size, bias.size, mean.size, var.size}) != 1:  # found by fuzz/fuzz_loaders.py
                raise ModelLoadError(
                    f"{self.path}: {where}: scale, B, mean and var have {scale.size}, {bias.size}, {mean.size} "
                    f"and {var.size} entries; they need one per channel"
                )
            factor = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
            shift = bias - mean * factor
            if len(self.shape) < 2 or self.shape[1] != factor.size:
                raise UnsupportedLayerError(
                    f"{where}: {factor.size} channels, but the input has shape {self.shape} (channels on axis 1)"
                )
            per_channel = math.prod(self.shape[2:])
            self.diagonal(np.repeat(factor, per_channel), np.repeat(shift, per_channel), where)
        elif op == "Flatten":
            axis = int(attrs.get("axis", 1))
            axis = axis + len(self.shape) if axis < 0 else axis
            if not 0 <= axis <= len(self.shape):
                raise UnsupportedLayerError(f"{where}: axis {attrs.get('axis')} is out of range for shape {self.shape}")
            self.layout.reshape((math.prod(self.shape[:axis]), math.prod(self.shape[axis:])), where)
        elif op == "Reshape":
            self.reshape(node, attrs, where)
        elif op == "Pad":
            self.pad(node, attrs, where)
        elif op in ("Squeeze", "Unsqueeze"):
            self.squeeze(node, attrs, where)
        elif op == "Transpose":
            self.layout.transpose(attrs.get("perm", range(len(self.shape) - 1, -1, -1)), where)
        elif op in ("Identity", "Dropout") or (op == "Cast" and int(attrs.get("to", 0)) in (1, 11)):
            pass  # no-ops at evaluation; a Cast to float32 / float64 keeps the values
        elif op in _ACTIVATIONS:
            b.activation(activation(_ACTIVATIONS[op]))
        elif op == "LeakyRelu":
            b.activation(activation("leaky_relu", float(attrs.get("alpha", 0.01))))
        elif op == "Elu":
            b.activation(activation("elu", float(attrs.get("alpha", 1.0))))
        else:
            hint = f" ({_HINTS[op]})" if op in _HINTS else ""
            raise UnsupportedLayerError(
                f"{self.path}: {where} is not supported{hint}; lipsdp reads graphs of {SUPPORTED_OPS}"
            )

    def flat(self, where: str) -> None:
        """Gemm needs a (1, n) matrix; a batch of one with size-1 axes, (1, 1, 1, n) as MATLAB exports, is one."""
        if len(self.shape) < 1 or math.prod(self.shape[:-1]) != 1:
            raise UnsupportedLayerError(f"{where}: receives a tensor of shape {self.shape}; flatten it first")

    def matmul(self, node: Any, data: list[str], where: str) -> None:
        """x @ W on the last axis; over several rows (tokens, a batch of one with extra axes) block-diagonal."""
        if data != [node.input[0]]:
            raise UnsupportedLayerError(f"{where}: the data must be the first input (x @ W)")
        weight = self.const(node.input[1], where)
        if weight.ndim != 2:
            raise UnsupportedLayerError(f"{where}: weight of shape {weight.shape} is not a matrix")
        if not self.shape or self.shape[-1] != weight.shape[0]:
            raise UnsupportedLayerError(f"{where}: x of shape {self.shape} cannot multiply a {weight.shape} weight")
        rows = math.prod(self.shape[:-1])
        if rows * rows * weight.size > _MAX_KRON:
            raise UnsupportedLayerError(
                f"{where}: x @ W over {rows} rows would be a {rows * weight.shape[1]} x {rows * weight.shape[0]} "
                "matrix; too large to unroll"
            )
        matrix = weight.T if rows == 1 else np.kron(np.eye(rows), weight.T)
        self.dense(matrix, None, self.shape[:-1] + (weight.shape[1],), where)

    def squeeze(self, node: Any, attrs: dict[str, Any], where: str) -> None:
        """Squeeze / Unsqueeze: axes from the attribute (opset < 13) or the constant second input."""
        axes: Any = attrs.get("axes")
        if len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1], where).astype(np.int64).reshape(-1).tolist()
        shape = list(self.shape)
        if node.op_type == "Squeeze":
            if axes is None:
                new = [d for d in shape if d != 1]
            else:
                drop = {int(a) + len(shape) if int(a) < 0 else int(a) for a in axes}
                if any(not 0 <= a < len(shape) or shape[a] != 1 for a in drop):
                    raise UnsupportedLayerError(f"{where}: cannot squeeze axes {list(axes)} of shape {self.shape}")
                new = [d for i, d in enumerate(shape) if i not in drop]
        else:
            if axes is None:
                raise UnsupportedLayerError(f"{where}: Unsqueeze without axes")
            rank = len(shape) + len(axes)
            insert = sorted(int(a) + rank if int(a) < 0 else int(a) for a in axes)
            if any(not 0 <= a < rank for a in insert) or len(set(insert)) != len(insert):
                raise UnsupportedLayerError(f"{where}: cannot unsqueeze axes {list(axes)} of shape {self.shape}")
            new = shape
            for a in insert:
                new = new[:a] + [1] + new[a:]
        self.layout.reshape(tuple(new), where)

    def elementwise(self, op: str, node: Any, data: list[str], where: str) -> None:
        first = node.input[0] == data[0]
        other = node.input[1] if first else node.input[0]
        c = self.broadcast(self.const(other, where), where)
        ones = np.ones_like(c)
        if op == "Add":
            self.diagonal(ones, c, where)
        elif op == "Sub":
            self.diagonal(ones if first else -ones, -c if first else c, where)
        elif op == "Mul":
            self.diagonal(c, None, where)
        elif first:  # Div by a constant
            if np.any(c == 0):
                raise UnsupportedLayerError(f"{where}: division by zero in the constant")
            self.diagonal(1.0 / c, None, where)
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
        op = Conv2d.make(
            weight, self.image(where), stride=strides, padding=pads, dilation=dilation, groups=int(attrs.get("group", 1))
        )
        matrix, shape = op.matrix(), op.out_shape
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.repeat(self.const(node.input[2], where), shape[1] * shape[2])
        self.dense(matrix, bias, (1, *shape), where, op)

    def avgpool(self, node: Any, attrs: dict[str, Any], where: str) -> None:
        shape = self.image(where)
        if node.op_type == "GlobalAveragePool":
            matrix, out = avgpool2d_matrix(shape, shape[1:], stride=1)
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
            matrix, out = avgpool2d_matrix(
                shape, kernel, stride=strides, padding=pads, count_include_pad=bool(attrs.get("count_include_pad", 0))
            )
        self.dense(matrix, None, (1, *out), where)

    def pad(self, node: Any, attrs: dict[str, Any], where: str) -> None:
        """Pad: constant (zero or any value), edge, reflect or wrap; an affine map of the tensor."""
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        value = float(attrs.get("value", 0.0))
        if len(node.input) > 1 and node.input[1]:
            pads = [int(v) for v in self.const(node.input[1], where).reshape(-1)]
            if len(node.input) > 2 and node.input[2]:
                value = float(self.const(node.input[2], where).reshape(-1)[0])
        else:
            pads = [int(v) for v in attrs.get("pads", ())]
        rank = len(self.shape)
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            axes = [int(a) % rank for a in self.const(node.input[3], where).reshape(-1)]
        if len(pads) != 2 * len(axes):
            raise UnsupportedLayerError(f"{where}: {len(pads)} pads for {len(axes)} axes of shape {self.shape}")
        before, after = [0] * rank, [0] * rank
        for i, axis in enumerate(axes):
            before[axis], after[axis] = pads[i], pads[len(axes) + i]
        if rank and (before[0] or after[0]) and self.shape[0] == 1 and rank > 1:
            raise UnsupportedLayerError(f"{where}: pads the batch axis; lipsdp reads one sample at a time")
        try:
            matrix, bias, shape = pad_matrix(self.shape, before, after, mode, value)
        except ModelLoadError as exc:
            raise UnsupportedLayerError(f"{self.path}: {where}: {exc}") from None
        self.dense(matrix, bias, shape, where)

    def reshape(self, node: Any, attrs: dict[str, Any], where: str) -> None:
        """ONNX Reshape on the whole tensor (batch of one): 0 copies the input's size (unless allowzero), -1 infers."""
        target = [int(v) for v in self.const(node.input[1], where).reshape(-1)]
        size = math.prod(self.shape)
        allowzero = bool(attrs.get("allowzero", 0))
        rest = [self.shape[i] if v == 0 and not allowzero and i < len(self.shape) else v for i, v in enumerate(target)]
        known = math.prod(v for v in rest if v != -1)
        if rest.count(-1) == 1 and known > 0 and size % known == 0:
            rest = [size // known if v == -1 else v for v in rest]
        if any(v < 1 for v in rest) or math.prod(rest) != size:
            raise UnsupportedLayerError(f"{where}: reshape of shape {self.shape} to {target} does not keep its {size} entries")
        self.layout.reshape(tuple(rest), where)


def _merge_node(graph: Any, start: int, prepared: Any, consts: dict[str, np.ndarray]) -> str:
    """' and node N (Add) merges the branches (...)' for the first later node reading two computed tensors."""
    for index in range(start, len(graph.node)):
        node = graph.node[index]
        data = [name for name in node.input if name and name not in consts]
        if len(data) > 1:
            kind = " (a residual connection)" if node.op_type in ("Add", "Sum", "Sub") else ""
            return f", and {_describe(node, prepared.position(node, index))} merges them{kind}"
    return ""


class _OnnxGraph(_OnnxChain):
    """Reads a graph that branches or max-pools into a `lipsdp.graph.Graph`, one node at a time: the chain
    operations run on each node's input tensor (its graph node and `Layout`), merges and max pooling here."""

    def __init__(self, path: Path, prepared: Any) -> None:
        super().__init__(path, prepared)
        self.graph = Graph(self.layout.size, where=f"input '{prepared.input_name}'")
        self.tensors: dict[str, tuple[int, Layout]] = {prepared.input_name: (0, Layout(prepared.input_shape))}
        self.comparators: dict[frozenset, dict[str, int]] = {}  # (a, b) -> its Max and Min graph nodes

    def enter(self, name: str, where: str) -> None:
        """Make tensor `name` the current one of the chain operations."""
        node, layout = self.tensors[name]
        self.layout = copy.copy(layout)
        self.builder = GraphBuilder(self.graph, node, str(self.path), where)

    def plain(self, name: str, where: str) -> int:
        """The graph node holding tensor `name` in C order (a pending permutation applied)."""
        node, layout = self.tensors[name]
        permutation = layout.output_permutation()
        return node if permutation is None else self.graph.affine(node, permutation, None, where)

    def walk(self, prepared: Any) -> Network:
        graph = prepared.graph
        self.prepared_graph = graph
        consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
        for index, node in enumerate(graph.node):
            where = _describe(node, prepared.position(node, index))
            data = [name for name in node.input if name and name not in self.consts]
            if not data:
                raise UnsupportedLayerError(
                    f"{self.path}: {where} computes on constants only, and lipsdp could not evaluate it; fold "
                    "constants before export (e.g. onnxsim)"
                )
            unknown = [name for name in data if name not in self.tensors]
            if unknown:
                raise UnsupportedLayerError(f"{self.path}: {where} reads '{unknown[0]}', which no earlier node computes")
            extra = [o for o in node.output[1:] if o and consumers.get(o, 0)]
            if extra:
                kind = " (the indices of the maxima are not a Lipschitz function)" if node.op_type in _POOLS else ""
                raise UnsupportedLayerError(f"{self.path}: {where}: its extra outputs {extra} are used{kind}")
            op = node.op_type
            if op in _POOLS:
                self.maxpool(node, data[0], where)
            elif op in ("Max", "Min") and len(data) == 2:
                self.extremum(graph, node, data, where)
            elif op in ("TopK", "ReduceMax", "ReduceMin", "Gather", "Slice", "Split") and len(data) == 1:
                self.entries(node, data[0], where)
            elif op == "Sum" or (op in ("Add", "Sub") and len(data) > 1):
                self.sum(node, where)
            elif op == "Concat":
                self.concat(node, where)
            elif len(data) > 1:
                hint = f" ({_HINTS[op]})" if op in _HINTS else ""
                raise UnsupportedLayerError(
                    f"{self.path}: {where} combines the computed tensors {data}{hint}; lipsdp reads graphs whose "
                    "branches meet in Add, Sub, Sum or Concat"
                )
            else:
                self.enter(data[0], where)
                self.add(index, node, data)
                self.tensors[node.output[0]] = (self.builder.current, self.layout)
        if self.output not in self.tensors:
            raise UnsupportedLayerError(f"{self.path}: the graph output '{self.output}' is not computed from its input")
        self.graph.output = self.plain(self.output, "the final Transpose")
        return lower(self.graph)

    def sum(self, node: Any, where: str) -> None:
        """Add, Sub (second input negated) and Sum of computed tensors of one shape, plus any constants."""
        names = [name for name in node.input if name]
        shapes = {self.tensors[n][1].shape for n in names if n not in self.consts}
        if len(shapes) != 1:
            raise UnsupportedLayerError(
                f"{self.path}: {where} adds computed tensors of shapes {sorted(shapes)}; lipsdp adds computed tensors "
                "of one shape only (no broadcasting between them)"
            )
        indices = [self.tensors[n][1].index for n in names if n not in self.consts]
        same = all(i is None for i in indices) or (
            all(i is not None for i in indices) and all(np.array_equal(i, indices[0]) for i in indices))
        first = next(n for n in names if n not in self.consts)
        self.enter(first, where)
        if not same:
            self.layout.settle(self.layout.shape)
        nodes, constant = [], np.zeros(self.layout.size)
        for position, name in enumerate(names):
            sign = -1.0 if node.op_type == "Sub" and position == 1 else 1.0
            if name in self.consts:
                constant = constant + sign * self.broadcast(self.const(name, where), where)
                continue
            part = self.tensors[name][0] if same else self.plain(name, where)
            if sign < 0:
                part = self.graph.affine(part, -np.ones(self.layout.size), None, where)
            nodes.append(part)
        result = self.graph.add(nodes, where) if len(nodes) > 1 else nodes[0]
        if np.any(constant):
            result = self.graph.affine(result, np.ones(self.layout.size), self.layout.vector(constant), where)
        self.tensors[node.output[0]] = (result, self.layout)

    def concat(self, node: Any, where: str) -> None:
        """Concat along an axis: the flat vectors are stacked and the tensor's order becomes a `Layout` index."""
        names = [name for name in node.input if name]
        shapes = [self.tensors[n][1].shape if n not in self.consts else self.consts[n].shape for n in names]
        rank = len(shapes[0])
        axis = int(_attributes(node).get("axis", 0))
        axis = axis + rank if axis < 0 else axis
        if any(len(s) != rank for s in shapes) or not 0 <= axis < rank or any(
                s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:] for s in shapes):
            raise UnsupportedLayerError(f"{self.path}: {where} concatenates tensors of shapes {shapes} on axis {axis}")
        if axis == 0 and rank > 1:
            raise UnsupportedLayerError(f"{self.path}: {where} concatenates along the batch axis")
        nodes, parts = [], []
        for name, shape in zip(names, shapes):
            if name in self.consts:
                nodes.append(self.graph.constant(np.asarray(self.consts[name], dtype=np.float64).reshape(-1), where))
                parts.append((shape, None))
            else:
                graph_node, layout = self.tensors[name]
                nodes.append(graph_node)
                parts.append((shape, layout.index))
        self.tensors[node.output[0]] = (self.graph.concat(nodes, where), concat_layout(parts, axis))

    def maxpool(self, node: Any, name: str, where: str) -> None:
        """MaxPool (2-D, floor mode; -inf padding ignored) and GlobalMaxPool as windows of the flat vector."""
        self.enter(name, where)
        c, h, w = self.image(where)
        if node.op_type == "GlobalMaxPool":
            windows = np.arange(c)[:, None] * (h * w) + np.arange(h * w)[None, :]
            out = (c, 1, 1)
        else:
            attrs = _attributes(node)
            kernel = tuple(int(k) for k in attrs.get("kernel_shape", ()))
            if len(kernel) != 2:
                raise UnsupportedLayerError(f"{self.path}: {where}: only 2-D max pooling is supported (kernel {kernel})")
            dilation = tuple(int(d) for d in attrs.get("dilations", (1, 1)))
            strides, pads = self._window(attrs, kernel, dilation, where)
            if attrs.get("ceil_mode", 0):
                sizes = [(h, w)[i] + pads[i] + pads[2 + i] - dilation[i] * (kernel[i] - 1) - 1 for i in (0, 1)]
                if any(size % strides[i] for i, size in enumerate(sizes)):
                    raise UnsupportedLayerError(f"{self.path}: {where}: ceil_mode=1 with partial windows is not supported")
            try:
                windows, out = maxpool2d_windows((c, h, w), kernel, stride=strides, padding=pads, dilation=dilation)
            except ModelLoadError as exc:
                raise UnsupportedLayerError(f"{self.path}: {where}: {exc}") from None
        if self.layout.index is not None:  # windows of the tensor's positions, as indices of the flat vector
            flat = self.layout.index.reshape(-1)
            windows = np.where(windows >= 0, flat[np.maximum(windows, 0)], -1)
        pooled = self.graph.maxpool(self.builder.current, windows, where)
        self.tensors[node.output[0]] = (pooled, Layout((1, *out)))


    def extremum(self, graph: Any, node: Any, data: list[str], where: str) -> None:
        """Max / Min of two computed tensors of one shape: a comparator per entry when the graph takes both
        of the same pair (MaxMin), else a max pool of pairs (`Graph.extrema`)."""
        shapes = {self.tensors[n][1].shape for n in data}
        if len(shapes) != 1:
            raise UnsupportedLayerError(f"{self.path}: {where} takes the {node.op_type} of tensors of shapes "
                                        f"{sorted(shapes)}; lipsdp reads tensors of one shape (no broadcasting)")
        name = "maximum" if node.op_type == "Max" else "minimum"
        other = "Min" if node.op_type == "Max" else "Max"
        key = frozenset(data)
        partnered = any(n.op_type == other and frozenset(i for i in n.input if i) == key for n in graph.node)
        if partnered and key not in self.comparators:
            self.comparators[key] = self.graph.extrema(self.plain(data[0], where), self.plain(data[1], where),
                                                       ["maximum", "minimum"], where)
        if partnered:
            result = self.comparators[key][name]
        else:
            result = self.graph.extrema(self.plain(data[0], where), self.plain(data[1], where), [name], where)[name]
        self.tensors[node.output[0]] = (result, Layout(shapes.pop()))

    def _reduce_axis(self, node: Any, rank: int, here: str) -> int:
        """The one axis of a ReduceMax / ReduceMin (attribute before opset 18, input after)."""
        axes = _attributes(node).get("axes", None)
        if axes is None and len(node.input) > 1 and node.input[1] in self.consts:
            axes = np.asarray(self.consts[node.input[1]]).reshape(-1).tolist()
        if axes is None or len(axes) != 1:
            raise UnsupportedLayerError(f"{here}: {node.op_type} over axes {axes}; lipsdp reads one axis")
        return int(axes[0]) % rank

    def entries(self, node: Any, name: str, where: str) -> None:
        """TopK (a full sort), ReduceMax / ReduceMin (one axis), Gather, Slice, Split with constant indices."""
        self.enter(name, where)
        op, attrs, shape = node.op_type, _attributes(node), self.layout.shape
        inputs = [self.consts.get(i) if i else None for i in node.input[1:]]
        here = f"{self.path}: {where}"
        positions = self.layout.positions()
        if op == "TopK":
            axis = int(attrs.get("axis", -1)) % len(shape)
            k = int(np.asarray(inputs[0]).reshape(-1)[0])
            if k != shape[axis] or not int(attrs.get("sorted", 1)):
                raise UnsupportedLayerError(f"{here}: TopK keeps {k} of {shape[axis]} entries; lipsdp reads a "
                                            "full sort (GroupSort) only")
            groups = self.layout.groups_along(axis, here)
            current = self.builder.current
            if groups.shape[1] > 1:
                current = self.graph.groupsort(current, groups, bool(int(attrs.get("largest", 1))), where)
            self.tensors[node.output[0]] = (current, copy.copy(self.layout))
            return
        if op in ("ReduceMax", "ReduceMin"):
            axis = self._reduce_axis(node, len(shape), here)
            groups = self.layout.groups_along(axis, here)
            kind = "maximum" if op == "ReduceMax" else "minimum"
            other = "ReduceMin" if op == "ReduceMax" else "ReduceMax"
            partnered = any(n.op_type == other and n.input[:1] == node.input[:1]
                            and self._reduce_axis(n, len(shape), here) == axis for n in self.prepared_graph.node)
            key = (name, axis)
            if partnered and key not in self.comparators:
                self.comparators[key] = self.graph.group_extrema(self.builder.current, groups,
                                                                 ["maximum", "minimum"], where)
            current = (self.comparators[key] if partnered
                       else self.graph.group_extrema(self.builder.current, groups, [kind], where))[kind]
            out = list(shape)
            out[axis] = 1
            if not int(attrs.get("keepdims", 1)):
                del out[axis]
            self.tensors[node.output[0]] = (current, Layout(out))
            return
        if any(i is None for i in inputs[: {"Gather": 1, "Slice": 2, "Split": 0}[op]]):
            raise UnsupportedLayerError(f"{here}: its indices must be constants")
        if op == "Gather":
            axis = int(attrs.get("axis", 0)) % len(shape)
            parts = [np.take(positions, np.asarray(inputs[0]).astype(np.int64), axis=axis)]
        elif op == "Slice":
            starts, ends = (np.asarray(v).astype(np.int64).reshape(-1) for v in inputs[:2])
            axes = np.asarray(inputs[2]).astype(np.int64).reshape(-1) if len(inputs) > 2 and inputs[2] is not None \
                else np.arange(starts.size)
            steps = np.asarray(inputs[3]).astype(np.int64).reshape(-1) if len(inputs) > 3 and inputs[3] is not None \
                else np.ones(starts.size, dtype=np.int64)
            index = [slice(None)] * len(shape)
            for start, end, axis, step in zip(starts, ends, axes, steps):
                index[int(axis) % len(shape)] = slice(int(start), int(end), int(step))
            parts = [positions[tuple(index)]]
        else:  # Split
            axis = int(attrs.get("axis", 0)) % len(shape)
            sizes = attrs.get("split") if "split" in attrs else (inputs[0] if inputs and inputs[0] is not None else None)
            if sizes is None:
                pieces = len([o for o in node.output if o])
                sizes = [shape[axis] // pieces] * pieces
            parts = np.split(positions, np.cumsum(np.asarray(sizes, dtype=np.int64))[:-1], axis=axis)
        if parts[0].ndim and parts[0].shape[0] != 1 and len(shape) > 1:
            raise UnsupportedLayerError(f"{here} takes entries along the batch axis")
        for output, part in zip(node.output, parts):
            if output:
                self.tensors[output] = (self.graph.select(self.builder.current, part, where), Layout(part.shape))


def _needs_graph(graph: Any, consts: dict[str, np.ndarray]) -> bool:
    """True when the graph is not a chain: a computed tensor read by several nodes (or also an output), a
    node merging computed tensors, or max pooling."""
    readers: dict[str, int] = {}
    for node in graph.node:
        data = [name for name in node.input if name and name not in consts]
        if node.op_type in _POOLS | _GRAPH_OPS or (node.op_type in _MERGES and (len(data) > 1 or node.op_type in ("Concat", "Sum"))):
            return True
        for name in set(data):
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    return any(count > 1 or (name in outputs) for name, count in readers.items())


def load_onnx(path: str | Path, *, input_shape: tuple[int, ...] | None = None, **_: Any) -> Network:
    """Read an ONNX graph into a Network (float64 copies of its weights): a chain directly, a graph that
    branches or max-pools through `lipsdp.graph` (the exact lowering to a chain).

    `input_shape` (per sample, no batch dimension) is needed only when the graph's input has symbolic sizes
    other than the batch dimension. Raises ModelLoadError for unreadable files and UnsupportedLayerError
    naming the node for operations or graph shapes lipsdp cannot read.
    """
    try:
        import onnx  # noqa: F401 - only to give a clear error when the extra is missing
    except ImportError:
        raise ModelLoadError("reading .onnx files needs the onnx extra: pip install 'lipsdp[onnx]'") from None
    from lipsdp.io.onnx_graph import prepare, read_model

    path = Path(path)
    model = read_model(path)
    if not model.graph.node:
        raise ModelLoadError(f"{path}: the ONNX graph has no nodes")
    prepared = prepare(model, str(path), input_shape)
    graph = prepared.graph
    if _needs_graph(graph, prepared.consts):
        return _OnnxGraph(path, prepared).walk(prepared)
    chain = _OnnxChain(path, prepared)
    consumers: dict[str, int] = {}
    readers: dict[str, list[str]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
            readers.setdefault(name, []).append(_describe(node, prepared.position(node, index)))
    for index, node in enumerate(graph.node):
        where = _describe(node, prepared.position(node, index))
        data = [name for name in node.input if name and name not in chain.consts]
        if not data:  # left unfolded: the reference evaluator could not run it
            raise UnsupportedLayerError(
                f"{path}: {where} computes on constants only, and lipsdp could not evaluate it; fold constants "
                "before export (e.g. onnxsim)"
            )
        if len(data) > 1:
            raise UnsupportedLayerError(
                f"{path}: {where} combines the computed tensors {data}: the graph branches (a residual connection "
                "or another merge of branches); residual and branching graphs are not supported yet, lipsdp reads "
                "chain graphs only"
            )
        if data[0] != chain.current:
            raise UnsupportedLayerError(
                f"{path}: {where} reads '{data[0]}', not the output of the previous layer: the graph is not a chain"
            )
        if consumers.get(chain.current, 0) > 1 or chain.current == chain.output:
            merge = _merge_node(graph, index, prepared, chain.consts)
            raise UnsupportedLayerError(
                f"{path}: tensor '{chain.current}' feeds several nodes ({', '.join(readers.get(chain.current, []))})"
                f" or is also a graph output: the graph branches{merge}; residual and branching graphs are not "
                "supported yet, lipsdp reads chain graphs only"
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
    permutation = chain.layout.output_permutation()
    if permutation is not None:  # a Transpose at the very end: the only place a permutation becomes a matrix
        chain.builder.affine(permutation, None, "the final Transpose")
    return chain.builder.build()
