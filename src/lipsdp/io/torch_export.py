"""Any torch module -> Network, through `torch.export` (an ATen graph), when the graph is a chain.

`from_module` exports the module (evaluation mode, one example sample of `input_shape`, batch of one)
and `from_exported` walks the resulting `ExportedProgram`: the aten ops on the data path become affine
maps (linear, conv2d, avg_pool2d, adaptive_avg_pool2d, batch_norm in eval mode, add/sub/mul/div by
constants), data movement (view, reshape, flatten, squeeze, unsqueeze, permute, transpose: see
`layout.Layout`) or elementwise activations (relu, leaky_relu, tanh, sigmoid, elu, softplus). So custom
modules with a `forward` (x.view(x.size(0), -1), F.relu, loops that unroll into a chain) read without any
module walking, and nodes that compute from parameters only (weight normalisation, w.t()) are evaluated
once. Padding (aten.pad / constant_pad_nd / reflection_pad / replication_pad: constant, reflect,
replicate, circular) is an affine map. A graph that branches (residual `add` / `sub` of two computed
tensors, `cat`) or max-pools (max_pool2d) is read into a `lipsdp.graph.Graph` by the same operations and
lowered exactly to a chain (`lipsdp.graph.to_network`); a chain keeps the direct path. Attention,
products of computed tensors and other ops raise an error naming the node. Shapes come from the exported
program itself (every node records its output).

`load_pt2` reads files written by `torch.export.save`. `torch.export.load` can unpickle and can load
compiled code, so lipsdp first opens the archive itself and refuses any that holds pickled weights or
constants, custom objects, AOTInductor binaries or sample inputs that need a full unpickler.
"""

from __future__ import annotations

import copy
import io
import json
import math
import zipfile
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
from lipsdp.unroll import avgpool2d_matrix, maxpool2d_windows, pad_matrix

SUPPORTED_OPS = (
    "linear, conv2d, avg_pool2d, adaptive_avg_pool2d, max_pool2d, batch_norm (eval), add/sub/mul/div/neg by "
    "constants, add/sub of computed tensors (residual connections), cat, pad, view, reshape, flatten, squeeze, "
    "unsqueeze, permute, transpose, dropout (eval), relu, leaky_relu, tanh, sigmoid, elu, softplus"
)
_HINTS = {
    "max_pool": "only 2-D max pooling (max_pool2d) is supported",
    "mul": "a product of two computed tensors is not an affine map",
    "softmax": "drop the final softmax and bound the logits (certified radii use logit margins)",
    "layer_norm": "layer normalisation is not an affine map of the input; it cannot be folded",
    "scaled_dot_product_attention": "attention multiplies computed tensors; it has no global Lipschitz "
    "constant LipSDP can bound",
    "bmm": "a product of two computed tensors (attention-like) is not a chain of affine maps and activations",
    "gelu": "GELU is not monotone (its slope dips below 0), so it has no slope bounds [0, beta] here",
    "silu": "SiLU is not monotone (its slope dips below 0), so it has no slope bounds [0, beta] here",
    "hardtanh": "hardtanh (clamp) is slope-restricted on [0, 1] but not yet one of lipsdp's activations",
    "relu6": "relu6 (clamp to [0, 6]) is slope-restricted on [0, 1] but not yet one of lipsdp's activations",
}
def _hint(name: str) -> str | None:
    """The hint for an op name: short keys ('cat', 'bmm') match exactly, longer ones as substrings."""
    base = name.lstrip("_")
    return next((text for key, text in _HINTS.items() if base == key or (len(key) > 4 and key in base)), None)


_IDENTITY = {"alias", "clone", "contiguous", "detach", "lift_fresh_copy", "_to_copy", "to"}
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze", "unflatten"}
_TRANSPOSES = {"permute", "transpose", "t", "numpy_T"}
_ELEMENTWISE = {"add", "sub", "mul", "div", "rsub", "neg"}
_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_PADS = {"pad": None, "constant_pad_nd": "constant", "reflection_pad1d": "reflect", "reflection_pad2d": "reflect",
         "reflection_pad3d": "reflect", "replication_pad1d": "edge", "replication_pad2d": "edge",
         "replication_pad3d": "edge", "_pad_circular": "wrap"}
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
_MAX_POOLS = {"max_pool2d", "max_pool2d_with_indices"}
# Sorting and extrema along an axis, and elementwise max / min of two tensors (MaxMin, GroupSort)
_SORTS = {"sort"}
_REDUCTIONS = {"max", "min", "amax", "amin"}
_EXTREMA = {"maximum", "minimum"}
# Taking entries of a tensor: one index (select), a strided range (slice), equal pieces (chunk, split, unbind)
_PICKS = {"select", "slice", "chunk", "split", "split_with_sizes", "unbind"}
_MAX_KRON = 50_000_000


def _op_name(node: Any) -> str:
    """'linear' for torch.ops.aten.linear.default (the overload packet's name)."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        name = getattr(packet, "__name__", name)
    return name.split(".")[-1]


def _describe(node: Any) -> str:
    target = node.target
    label = getattr(target, "__name__", str(target)) if node.op == "call_function" else node.op
    if hasattr(target, "_overloadpacket"):
        label = f"aten.{target._overloadpacket.__name__}.{target._overloadname}"
    return f"node '{node.name}' ({label})"


def _numpy(value: Any) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy().copy()
    return np.asarray(value, dtype=np.float64)


def _shape_of(node: Any) -> tuple[int, ...]:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        raise UnsupportedLayerError(f"{_describe(node)} records no tensor shape; re-export the model")
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise UnsupportedLayerError(
            f"{_describe(node)} has symbolic sizes {tuple(shape)}; export with a static example input"
        ) from None


class _ExportChain:
    """Walks an ExportedProgram's graph in order, folding constants and feeding a ChainBuilder."""

    def __init__(self, program: Any, source: str) -> None:
        from torch.export.graph_signature import InputKind

        self.source = source
        self.builder = ChainBuilder(source)
        self.consts: dict[Any, Any] = {}  # fx node -> tensor or Python value (parameters, buffers, folded)
        user_inputs = []
        specs = {spec.arg.name: spec for spec in program.graph_signature.input_specs if hasattr(spec.arg, "name")}
        for node in program.graph.nodes:
            if node.op != "placeholder":
                continue
            spec = specs.get(node.name)
            if spec is None or spec.kind == InputKind.USER_INPUT:
                user_inputs.append(node)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.consts[node] = program.state_dict[spec.target] if spec.target in program.state_dict else \
                    program.constants[spec.target]
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                self.consts[node] = program.constants[spec.target]
            else:
                raise UnsupportedLayerError(f"{source}: input '{node.name}' of kind {spec.kind.name} is not supported")
        if len(user_inputs) != 1:
            names = ", ".join(n.name for n in user_inputs)
            raise UnsupportedLayerError(f"{source}: the model takes {len(user_inputs)} inputs ({names}); lipsdp reads "
                                        "models with one input tensor")
        self.current = user_inputs[0]
        self.layout = Layout(_shape_of(self.current))
        self.builder.size = self.layout.size

    # -- graph walk -----------------------------------------------------------------------------------
    def walk(self, program: Any) -> Network:
        for node in program.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                self.consts[node] = getattr(program.graph_module, node.target)
                continue
            if node.op == "output":
                self.finish(node)
                break
            if node.op != "call_function":
                raise UnsupportedLayerError(f"{self.source}: {_describe(node)} is not supported ({node.op})")
            self.visit(node)
        return self.result()

    def visit(self, node: Any) -> None:
        """One call_function node (the graph walker overrides this)."""
        self.call(node)

    def result(self) -> Network:
        return self.builder.build()

    def finish(self, node: Any) -> None:
        outputs = node.args[0]
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        if len(outputs) != 1:
            raise UnsupportedLayerError(
                f"{self.source}: the model returns {len(outputs)} values; lipsdp reads models with one output tensor"
            )
        if outputs[0] is not self.current:
            raise UnsupportedLayerError(
                f"{self.source}: the output '{getattr(outputs[0], 'name', outputs[0])}' is not the end of the chain "
                f"('{self.current.name}')"
            )
        permutation = self.layout.output_permutation()
        if permutation is not None:
            self.builder.affine(permutation, None, "the final permute")

    def data_args(self, node: Any) -> list[Any]:
        """The fx nodes among the arguments that are not constants (the data path)."""
        found: list[Any] = []

        def visit(value: Any) -> None:
            if isinstance(value, (list, tuple)):
                for v in value:
                    visit(v)
            elif hasattr(value, "op") and hasattr(value, "users") and value not in self.consts:
                found.append(value)

        visit(node.args)
        visit(node.kwargs)
        return found

    def value(self, arg: Any) -> Any:
        """Arguments with constant nodes replaced by their values."""
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        if hasattr(arg, "op") and hasattr(arg, "users"):
            return self.consts[arg]
        return arg

    def call(self, node: Any) -> None:
        import torch

        data = self.data_args(node)
        where = _describe(node)
        name = _op_name(node)
        if not data:
            if name == "_assert_tensor_metadata":
                return
            with torch.no_grad():  # computed from parameters only: evaluate once
                self.consts[node] = node.target(*self.value(node.args), **self.value(node.kwargs))
            return
        if name == "_assert_tensor_metadata":
            return
        if len(data) > 1 or any(d is not data[0] for d in data):
            kind = " (a residual connection)" if name in ("add", "sub") else ""
            hint = f"; {_hint(name)}" if _hint(name) else ""
            raise UnsupportedLayerError(
                f"{self.source}: {where} combines computed tensors ({', '.join(d.name for d in data)}){kind}{hint}; "
                "residual and branching graphs are not supported yet, lipsdp reads chains only"
            )
        if data[0] is not self.current:
            raise UnsupportedLayerError(
                f"{self.source}: {where} reads '{data[0].name}', not the output of the previous step: the graph "
                "branches; residual and branching graphs are not supported yet, lipsdp reads chains only"
            )
        if len(self.current.users) > 1:
            readers = ", ".join(_describe(u) for u in self.current.users)
            raise UnsupportedLayerError(
                f"{self.source}: '{self.current.name}' feeds several nodes ({readers}): the graph branches"
                f"{self.merge_after(self.current)}; residual and branching graphs are not supported yet, lipsdp "
                "reads chains only"
            )
        self.apply(node, name, where)
        self.current = node

    def merge_after(self, start: Any) -> str:
        """', and node N (aten.add.Tensor) merges them (...)' for the first later node reading two tensors
        computed from `start`, or ''."""
        derived = {start}
        node = start.next
        while node.op != "root" and node.op != "output":
            inputs = [a for a in node.all_input_nodes if a in derived]
            if inputs:
                derived.add(node)
                if len(set(inputs)) > 1:
                    kind = " (a residual connection)" if _op_name(node) in ("add", "sub") else ""
                    return f", and {_describe(node)} merges them{kind}"
            node = node.next
        return ""

    # -- operations -----------------------------------------------------------------------------------
    def apply(self, node: Any, name: str, where: str) -> None:
        args = [self.value(a) if a is not self.current else None for a in node.args]
        kwargs = {k: (self.value(v) if v is not self.current else None) for k, v in node.kwargs.items()}
        # The recorded output shape (multi-output ops such as the batch norm record a tuple instead).
        out_shape = _shape_of(node) if name not in ("getitem", "_native_batch_norm_legit_no_training") else None
        b = self.builder
        if name == "linear":
            weight = _numpy(args[1])
            bias = _arg(args, kwargs, 2, "bias", None)
            self.rows_dense(weight, None if bias is None else _numpy(bias), out_shape, where)
        elif name in ("addmm", "mm", "matmul"):
            self.matmul(node, name, args, kwargs, out_shape, where)
        elif name in ("conv2d", "convolution"):
            self.conv(name, args, kwargs, out_shape, where)
        elif name in ("avg_pool2d", "adaptive_avg_pool2d"):
            self.avgpool(name, args, kwargs, out_shape, where)
        elif name in ("batch_norm", "_native_batch_norm_legit_no_training"):
            self.batch_norm(name, args, kwargs, where)
        elif name == "getitem":
            if args[1] != 0 or _op_name(self.current) != "_native_batch_norm_legit_no_training":
                raise UnsupportedLayerError(f"{self.source}: {where}: only the first output of a batch norm is read")
        elif name in _RESHAPES:
            self.layout.reshape(out_shape, where)
        elif name in _TRANSPOSES:
            ndim = len(self.layout.shape)
            if name == "permute":
                perm = list(_arg(args, kwargs, 1, "dims", None))
            else:
                perm = list(range(ndim))
                if name == "transpose":
                    i, j = int(args[1]) % ndim, int(args[2]) % ndim
                else:
                    i, j = 0, ndim - 1 if ndim > 1 else 0
                perm[i], perm[j] = perm[j], perm[i]
            self.layout.transpose(perm, where)
        elif name in _IDENTITY:
            dtype = kwargs.get("dtype")
            if dtype is not None and not getattr(dtype, "is_floating_point", True):
                raise UnsupportedLayerError(f"{self.source}: {where} converts the data to {dtype}")
        elif name in ("dropout", "feature_dropout"):
            if _arg(args, kwargs, 2, "train", False):
                raise UnsupportedLayerError(f"{self.source}: {where} is a training-mode dropout; export in eval mode")
        elif name in _ELEMENTWISE:
            self.elementwise(node, name, args, kwargs, out_shape, where)
        elif name in _PADS:
            self.pad(name, args, kwargs, out_shape, where)
        elif name in _ACTIVATIONS:
            b.activation(activation(_ACTIVATIONS[name]))
        elif name in ("clamp", "clamp_min", "clamp_") and _is_relu_clamp(name, args, kwargs):
            b.activation(activation("relu"))  # x.clamp(min=0)
        elif name in ("leaky_relu", "leaky_relu_"):
            b.activation(activation("leaky_relu", float(_arg(args, kwargs, 1, "negative_slope", 0.01))))
        elif name in ("elu", "elu_"):
            scale, input_scale = _arg(args, kwargs, 2, "scale", 1), _arg(args, kwargs, 3, "input_scale", 1)
            if float(scale) != 1.0 or float(input_scale) != 1.0:
                raise UnsupportedLayerError(f"{self.source}: {where}: only elu with scale 1 is supported (not SELU)")
            b.activation(activation("elu", float(_arg(args, kwargs, 1, "alpha", 1.0))))
        elif name == "softplus":
            if float(_arg(args, kwargs, 1, "beta", 1)) != 1.0:
                raise UnsupportedLayerError(
                    f"{self.source}: {where}: only softplus with beta=1 is supported; fold beta into the "
                    "neighbouring linear layers (softplus(beta x) / beta)"
                )
            b.activation(activation("softplus"))
        else:
            hint = f" ({_hint(name)})" if _hint(name) else ""
            raise UnsupportedLayerError(
                f"{self.source}: {where} is not supported{hint}; lipsdp reads graphs of {SUPPORTED_OPS}"
            )

    def dense(
        self, matrix: np.ndarray, bias: np.ndarray | None, shape: tuple[int, ...], where: str, operator: object = None
    ) -> None:
        # the operator (e.g. a Conv2d) acts on the tensor in C order: kept only while that is the vector's order
        self.builder.affine(self.layout.columns(matrix), bias, where, operator if self.layout.index is None else None)
        self.layout.settle(shape)

    def pad(self, name: str, args: list, kwargs: dict, out_shape, where: str) -> None:
        """Constant, reflect, replicate or circular padding: amounts in pairs from the last axis backwards."""
        shape = self.layout.shape
        amounts = [int(v) for v in _arg(args, kwargs, 1, "pad" if name in ("pad", "constant_pad_nd") else "padding", ())]
        mode = _PADS[name]
        if mode is None:
            given = str(_arg(args, kwargs, 2, "mode", "constant"))
            if given not in _PAD_MODES:
                raise UnsupportedLayerError(f"{self.source}: {where}: padding mode '{given}' is not supported")
            mode = _PAD_MODES[given]
        value = _arg(args, kwargs, 3 if name == "pad" else 2, "value", None) if mode == "constant" else None
        if len(amounts) % 2 or len(amounts) // 2 > len(shape):
            raise UnsupportedLayerError(f"{self.source}: {where}: padding {amounts} does not fit shape {shape}")
        before, after = [0] * len(shape), [0] * len(shape)
        for i in range(len(amounts) // 2):
            before[len(shape) - 1 - i], after[len(shape) - 1 - i] = amounts[2 * i], amounts[2 * i + 1]
        if len(shape) > 1 and (before[0] or after[0]):
            raise UnsupportedLayerError(f"{self.source}: {where} pads the batch axis; lipsdp reads one sample at a time")
        try:
            matrix, bias, padded = pad_matrix(shape, before, after, mode, 0.0 if value is None else float(value))
        except ModelLoadError as exc:
            raise UnsupportedLayerError(f"{self.source}: {where}: {exc}") from None
        if tuple(padded) != tuple(out_shape):
            raise UnsupportedLayerError(
                f"{self.source}: {where}: lipsdp pads to shape {tuple(padded)}, torch recorded {tuple(out_shape)}"
            )
        self.dense(matrix, bias, out_shape, where)

    def diagonal(self, scale: np.ndarray, shift: np.ndarray | None, where: str) -> None:
        vector = self.layout.vector
        self.builder.affine(vector(scale), None if shift is None else vector(shift), where)

    def rows_dense(self, weight: np.ndarray, bias: np.ndarray | None, out_shape, where: str) -> None:
        """x @ W.T + b on the last axis of x, for every leading index (block-diagonal when there are several)."""
        shape = self.layout.shape
        if weight.ndim != 2 or not shape or shape[-1] != weight.shape[1]:
            raise UnsupportedLayerError(f"{self.source}: {where}: weight {weight.shape} does not fit input {shape}")
        rows = math.prod(shape[:-1])
        if rows * rows * weight.size > _MAX_KRON:
            raise UnsupportedLayerError(f"{self.source}: {where}: a linear map over {rows} rows is too large to unroll")
        matrix = weight if rows == 1 else np.kron(np.eye(rows), weight)
        if bias is not None and rows > 1:
            bias = np.tile(np.broadcast_to(bias, (weight.shape[0],)), rows)
        self.dense(matrix, bias, out_shape, where)

    def matmul(self, node: Any, name: str, args: list, kwargs: dict, out_shape, where: str) -> None:
        if name == "addmm":  # bias + x @ mat2
            if args[1] is not None or args[0] is None:
                raise UnsupportedLayerError(f"{self.source}: {where}: only bias + x @ W with constant bias and W")
            bias, weight = _numpy(args[0]), _numpy(args[2]).T
            if float(kwargs.get("beta", 1)) != 1.0 or float(kwargs.get("alpha", 1)) != 1.0:
                bias, weight = float(kwargs.get("beta", 1)) * bias, float(kwargs.get("alpha", 1)) * weight
            self.rows_dense(weight, bias, out_shape, where)
        else:
            if args[0] is not None:
                raise UnsupportedLayerError(f"{self.source}: {where}: only x @ W (data on the left) is supported")
            weight = _numpy(args[1])
            if weight.ndim != 2:
                raise UnsupportedLayerError(f"{self.source}: {where}: W of shape {weight.shape} is not a matrix")
            self.rows_dense(weight.T, None, out_shape, where)

    def image(self, where: str) -> tuple[int, int, int]:
        shape = self.layout.shape
        if len(shape) == 4 and shape[0] == 1:
            return shape[1:]  # type: ignore[return-value]
        if len(shape) == 3:
            return shape  # type: ignore[return-value]
        raise UnsupportedLayerError(f"{self.source}: {where}: needs a (1, C, H, W) input, got shape {shape}")

    def conv(self, name: str, args: list, kwargs: dict, out_shape, where: str) -> None:
        weight = _numpy(args[1])
        bias = _arg(args, kwargs, 2, "bias", None)
        stride = _pair(_arg(args, kwargs, 3, "stride", 1))
        padding = _arg(args, kwargs, 4, "padding", 0)
        dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
        if name == "convolution":
            if _arg(args, kwargs, 6, "transposed", False):
                raise UnsupportedLayerError(f"{self.source}: {where}: transposed convolutions are not supported")
            groups = int(_arg(args, kwargs, 8, "groups", 1))
        else:
            groups = int(_arg(args, kwargs, 6, "groups", 1))
        if weight.ndim != 4:
            raise UnsupportedLayerError(f"{self.source}: {where}: only 2-D convolutions are supported")
        if isinstance(padding, str):
            if padding == "valid":
                padding = 0
            else:  # 'same', stride 1: torch puts the odd extra row/column at the end
                totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
                padding = (totals[0] // 2, totals[1] // 2, totals[0] - totals[0] // 2, totals[1] - totals[1] // 2)
        image = self.image(where)
        op = Conv2d.make(weight, image, stride=stride, padding=padding, dilation=dilation, groups=groups)
        matrix, shape = op.matrix(), op.out_shape
        self.check_shape(shape, out_shape, where)
        full = np.repeat(_numpy(bias), shape[1] * shape[2]) if bias is not None else None
        self.dense(matrix, full, out_shape, where, op)

    def avgpool(self, name: str, args: list, kwargs: dict, out_shape, where: str) -> None:
        image = self.image(where)
        if name == "adaptive_avg_pool2d":
            out = _pair(args[1])
            if image[1] % out[0] or image[2] % out[1]:
                raise UnsupportedLayerError(
                    f"{self.source}: {where}: output size {out} does not divide the input size {image[1:]}; only "
                    "the equal-window case is supported"
                )
            kernel = (image[1] // out[0], image[2] // out[1])
            matrix, shape = avgpool2d_matrix(image, kernel, stride=kernel)
        else:
            kernel = _pair(args[1])
            stride = _arg(args, kwargs, 2, "stride", None)
            stride = kernel if not stride else _pair(stride)
            matrix, shape = avgpool2d_matrix(
                image, kernel, stride=stride, padding=_pair(_arg(args, kwargs, 3, "padding", 0)),
                count_include_pad=bool(_arg(args, kwargs, 5, "count_include_pad", True)),
                divisor_override=_arg(args, kwargs, 6, "divisor_override", None),
            )
            if tuple(shape) != tuple(out_shape[-3:]):
                raise UnsupportedLayerError(f"{self.source}: {where}: ceil_mode=True with partial windows is not supported")
        self.check_shape(shape, out_shape, where)
        self.dense(matrix, None, out_shape, where)

    def check_shape(self, shape, out_shape, where: str) -> None:
        if tuple(shape) != tuple(out_shape[-3:]) or math.prod(shape) != math.prod(out_shape):
            raise UnsupportedLayerError(
                f"{self.source}: {where}: lipsdp computes an output of shape {tuple(shape)}, torch recorded "
                f"{tuple(out_shape)}"
            )

    def batch_norm(self, name: str, args: list, kwargs: dict, where: str) -> None:
        weight, bias, mean, var = args[1], args[2], args[3], args[4]
        if name == "batch_norm":
            if _arg(args, kwargs, 5, "training", False):
                raise UnsupportedLayerError(f"{self.source}: {where} normalises with batch statistics; export in eval mode")
            eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
        else:
            eps = float(_arg(args, kwargs, 6, "eps", 1e-5))
        if mean is None or var is None:
            raise UnsupportedLayerError(f"{self.source}: {where} has no running statistics, so it is not a fixed affine map")
        # The same arithmetic as the nn.Sequential path, so both give the same numbers.
        scale = 1.0 / np.sqrt(_numpy(var) + eps)
        if weight is not None:
            scale = scale * _numpy(weight)
        shift = -_numpy(mean) * scale
        if bias is not None:
            shift = shift + _numpy(bias)
        shape = self.layout.shape
        if len(shape) < 2 or shape[1] != scale.size:
            raise UnsupportedLayerError(f"{self.source}: {where}: {scale.size} channels, input shape {shape}")
        per_channel = math.prod(shape[2:])
        self.diagonal(np.repeat(scale, per_channel), np.repeat(shift, per_channel), where)

    def elementwise(self, node: Any, name: str, args: list, kwargs: dict, out_shape, where: str) -> None:
        shape = self.layout.shape
        if tuple(out_shape) != shape:
            raise UnsupportedLayerError(f"{self.source}: {where}: a constant of another shape grows the tensor {shape}")
        size = math.prod(shape)
        if name == "neg":
            self.diagonal(-np.ones(size), None, where)
            return
        first = args[0] is None
        other = args[1] if first else args[0]
        try:
            c = np.broadcast_to(_numpy(other), shape).reshape(-1).astype(np.float64)
        except ValueError:
            raise UnsupportedLayerError(f"{self.source}: {where}: a constant does not broadcast to {shape}") from None
        alpha = float(kwargs.get("alpha", args[2] if len(args) > 2 and name in ("add", "sub", "rsub") else 1))
        ones = np.ones(size)
        if name == "add":
            self.diagonal(ones if first else alpha * ones, alpha * c if first else c, where)
        elif name == "sub":  # args[0] - alpha * args[1]
            self.diagonal(ones if first else -alpha * ones, -alpha * c if first else c, where)
        elif name == "rsub":  # args[1] - alpha * args[0]
            self.diagonal(-alpha * ones if first else ones, c if first else -alpha * c, where)
        elif name == "mul":
            self.diagonal(c, None, where)
        elif first:  # div by a constant
            if np.any(c == 0):
                raise UnsupportedLayerError(f"{self.source}: {where}: division by zero in the constant")
            if kwargs.get("rounding_mode") is not None:
                raise UnsupportedLayerError(f"{self.source}: {where}: rounding division is not affine")
            self.diagonal(1.0 / c, None, where)
        else:
            raise UnsupportedLayerError(f"{self.source}: {where}: dividing a constant by the data is not affine")


class _ExportGraph(_ExportChain):
    """Reads a program that branches or max-pools into a `lipsdp.graph.Graph`: the chain operations run on
    each node's input tensor (its graph node and `Layout`); sums, concatenations and max pooling here."""

    def __init__(self, program: Any, source: str) -> None:
        super().__init__(program, source)
        self.graph = Graph(self.layout.size, where=f"input '{self.current.name}'")
        self.tensors: dict[Any, tuple[int, Layout]] = {self.current: (0, self.layout)}
        self.with_indices: set[Any] = set()
        self.comparators: dict[Any, dict[str, int]] = {}  # (a, b) or (tensor, axis) -> its max and min nodes
        self.pieces: dict[Any, list[tuple[int, Layout]]] = {}  # chunk / split / unbind: their outputs

    def enter(self, data: Any, where: str) -> None:
        node, layout = self.tensors[data]
        self.current = data
        self.layout = copy.copy(layout)
        self.builder = GraphBuilder(self.graph, node, self.source, where)

    def plain(self, data: Any, where: str) -> int:
        node, layout = self.tensors[data]
        permutation = layout.output_permutation()
        return node if permutation is None else self.graph.affine(node, permutation, None, where)

    def result(self) -> Network:
        return lower(self.graph)

    def finish(self, node: Any) -> None:
        outputs = node.args[0]
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        if len(outputs) != 1:
            raise UnsupportedLayerError(
                f"{self.source}: the model returns {len(outputs)} values; lipsdp reads models with one output tensor"
            )
        if outputs[0] not in self.tensors:
            raise UnsupportedLayerError(f"{self.source}: the output does not depend on the input")
        self.graph.output = self.plain(outputs[0], "the final permute")

    def visit(self, node: Any) -> None:
        import torch

        data = self.data_args(node)
        where = _describe(node)
        name = _op_name(node)
        if not data:
            if name != "_assert_tensor_metadata":
                with torch.no_grad():  # computed from parameters only: evaluate once
                    self.consts[node] = node.target(*self.value(node.args), **self.value(node.kwargs))
            return
        if name == "_assert_tensor_metadata":
            return
        if name in _MAX_POOLS and len(data) == 1:
            self.maxpool(node, name, data[0], where)
        elif name in _SORTS and len(data) == 1:
            self.sort(node, data[0], where)
        elif name in _REDUCTIONS and len(data) == 1 and len(node.args) + len(node.kwargs) > 1:
            self.reduce_extremum(node, name, data[0], where)
        elif name in _EXTREMA and len(data) == 2:
            self.extremum(node, name, data, where)
        elif name in _PICKS and len(data) == 1:
            self.pick(node, name, data[0], where)
        elif name == "getitem" and data[0] in self.pieces:
            self.tensors[node] = self.pieces[data[0]][int(node.args[1])]
        elif name == "getitem" and data[0] in self.with_indices:
            if node.args[1] != 0 and not node.users:
                return  # the unused indices output of a sort or max (torch.export keeps it)
            if node.args[1] != 0:
                raise UnsupportedLayerError(
                    f"{self.source}: {where} reads the indices of the maxima (or of a sort), which are not a "
                    "Lipschitz function"
                )
            self.tensors[node] = self.tensors[data[0]]
        elif name in ("add", "sub") and len(data) == 2:
            self.sum(node, name, data, where)
        elif name in ("cat", "stack"):
            self.cat(node, where, stack=name == "stack")
        elif len(data) > 1:
            hint = f"; {_hint(name)}" if _hint(name) else ""
            raise UnsupportedLayerError(
                f"{self.source}: {where} combines computed tensors ({', '.join(d.name for d in data)}){hint}; "
                "lipsdp reads graphs whose branches meet in add, sub or cat"
            )
        else:
            self.enter(data[0], where)
            self.apply(node, _op_name(node), where)
            self.tensors[node] = (self.builder.current, self.layout)

    def sum(self, node: Any, name: str, data: list, where: str) -> None:
        """a + alpha b or a - alpha b of two computed tensors of one shape."""
        first, second = data
        shapes = {self.tensors[first][1].shape, self.tensors[second][1].shape, _shape_of(node)}
        if len(shapes) != 1:
            raise UnsupportedLayerError(
                f"{self.source}: {where} adds computed tensors of shapes {sorted(shapes)}; lipsdp adds computed "
                "tensors of one shape only (no broadcasting between them)"
            )
        alpha = float(node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1))
        scale = -alpha if name == "sub" else alpha
        a, b = self.tensors[first][1].index, self.tensors[second][1].index
        same = (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
        self.enter(first, where)
        if not same:
            self.layout.settle(self.layout.shape)
        left = self.tensors[first][0] if same else self.plain(first, where)
        right = self.tensors[second][0] if same else self.plain(second, where)
        if scale != 1.0:
            right = self.graph.affine(right, np.full(self.layout.size, scale), None, where)
        self.tensors[node] = (self.graph.add([left, right], where), self.layout)

    def cat(self, node: Any, where: str, stack: bool = False) -> None:
        """torch.cat; torch.stack is a cat of the tensors with a new axis of length 1 at `dim`."""
        items = list(node.args[0])
        dim = int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        shapes, nodes, parts = [], [], []
        for item in items:
            if item in self.tensors:
                graph_node, layout = self.tensors[item]
                shape, index = layout.shape, layout.index
                nodes.append(graph_node)
            else:
                value = _numpy(self.value(item))
                shape, index = tuple(value.shape), None
                nodes.append(self.graph.constant(value.reshape(-1), where))
            if stack:
                at = dim % (len(shape) + 1)
                shape = shape[:at] + (1,) + shape[at:]
                index = None if index is None else index.reshape(shape)
            shapes.append(shape)
            parts.append((shape, index))
        rank = len(shapes[0])
        dim = dim % rank if rank else 0
        if any(len(s) != rank for s in shapes) or any(
                s[:dim] + s[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:] for s in shapes):
            raise UnsupportedLayerError(f"{self.source}: {where} concatenates tensors of shapes {shapes} on dim {dim}")
        if dim == 0 and rank > 1:
            raise UnsupportedLayerError(f"{self.source}: {where} concatenates along the batch axis")
        layout = concat_layout(parts, dim)
        if tuple(layout.shape) != _shape_of(node):
            raise UnsupportedLayerError(f"{self.source}: {where}: lipsdp concatenates to {layout.shape}, torch "
                                        f"recorded {_shape_of(node)}")
        self.tensors[node] = (self.graph.concat(nodes, where), layout)

    def maxpool(self, node: Any, name: str, data: Any, where: str) -> None:
        """max_pool2d (floor mode, -inf padding) as windows of the flat vector."""
        self.enter(data, where)
        args, kwargs = list(node.args), dict(node.kwargs)
        image = self.image(where)
        kernel = _pair(args[1])
        stride = _arg(args, kwargs, 2, "stride", None)
        stride = kernel if not stride else _pair(stride)
        padding = _pair(_arg(args, kwargs, 3, "padding", 0))
        dilation = _pair(_arg(args, kwargs, 4, "dilation", 1))
        try:
            windows, shape = maxpool2d_windows(image, kernel, stride=stride, padding=padding, dilation=dilation)
        except ModelLoadError as exc:
            raise UnsupportedLayerError(f"{self.source}: {where}: {exc}") from None
        val = node.meta.get("val")
        recorded = tuple(int(d) for d in (val[0] if isinstance(val, (tuple, list)) else val).shape)
        if tuple(shape) != recorded[-3:]:
            raise UnsupportedLayerError(
                f"{self.source}: {where}: lipsdp pools to shape {tuple(shape)}, torch recorded {recorded} "
                "(ceil_mode=True with partial windows is not supported)"
            )
        if self.layout.index is not None:
            flat = self.layout.index.reshape(-1)
            windows = np.where(windows >= 0, flat[np.maximum(windows, 0)], -1)
        pooled = self.graph.maxpool(self.builder.current, windows, where)
        if name == "max_pool2d_with_indices":
            self.with_indices.add(node)
        self.tensors[node] = (pooled, Layout(recorded))


    def pick(self, node: Any, name: str, data: Any, where: str) -> None:
        """select / slice / chunk / split / unbind: a selection of entries (an exact 0/1 affine map)."""
        self.enter(data, where)
        shape = self.layout.shape
        positions = self.layout.positions()
        args, kwargs = list(node.args), dict(node.kwargs)
        # dim is argument 1 of select / slice / unbind, argument 2 of chunk / split (after the sizes); default 0
        dim = int(_arg(args, kwargs, 1 if name in ("select", "slice", "unbind") else 2, "dim", 0)) % len(shape)
        if dim == 0 and len(shape) > 1:
            raise UnsupportedLayerError(f"{self.source}: {where} takes entries along the batch axis")
        if name == "select":
            parts = [np.take(positions, int(_arg(args, kwargs, 2, "index", 0)), axis=dim)]
        elif name == "slice":
            start, end = _arg(args, kwargs, 2, "start", None), _arg(args, kwargs, 3, "end", None)
            step = int(_arg(args, kwargs, 4, "step", 1))
            index = [slice(None)] * len(shape)
            index[dim] = slice(start, end, step)
            parts = [positions[tuple(index)]]
        elif name == "unbind":
            parts = [np.take(positions, i, axis=dim) for i in range(shape[dim])]
        else:
            size = args[1] if len(args) > 1 else kwargs.get("split_size", kwargs.get("chunks"))
            if name == "chunk":
                step = -(-shape[dim] // int(size))
                cuts = list(range(step, shape[dim], step))
            elif isinstance(size, int):
                cuts = list(range(int(size), shape[dim], int(size)))
            else:
                cuts = list(np.cumsum([int(v) for v in size])[:-1])
            parts = np.split(positions, cuts, axis=dim)
        outputs = [(self.graph.select(self.builder.current, part, where), Layout(part.shape)) for part in parts]
        if name in ("select", "slice"):
            self.tensors[node] = outputs[0]
        else:
            self.pieces[node] = outputs

    def sort(self, node: Any, data: Any, where: str) -> None:
        """torch.sort along an axis (GroupSort; MaxMin is groups of 2 in descending order)."""
        self.enter(data, where)
        args, kwargs = list(node.args), dict(node.kwargs)
        if node.target._overloadname == "stable":
            dim, descending = kwargs.get("dim", -1), kwargs.get("descending", False)
        else:
            dim, descending = _arg(args, kwargs, 1, "dim", -1), _arg(args, kwargs, 2, "descending", False)
        groups = self.layout.groups_along(int(dim), f"{self.source}: {where}")
        current = self.builder.current
        if groups.shape[1] > 1:
            current = self.graph.groupsort(current, groups, bool(descending), where)
        self.with_indices.add(node)
        self.tensors[node] = (current, copy.copy(self.layout))

    def reduce_extremum(self, node: Any, name: str, data: Any, where: str) -> None:
        """max / min / amax / amin along one axis (`Graph.group_extrema`: when the program takes both the
        max and the min of the same pairs, a comparator per pair)."""
        self.enter(data, where)
        dims = _arg(list(node.args), dict(node.kwargs), 1, "dim", None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if len(dims) != 1:
            raise UnsupportedLayerError(f"{self.source}: {where} reduces over {dims or 'every axis'}; lipsdp "
                                        "reads max / min along one axis")
        dim = int(dims[0]) % len(self.layout.shape)
        groups = self.layout.groups_along(dim, f"{self.source}: {where}")
        kind = "minimum" if name in ("min", "amin") else "maximum"

        def axis_of(user: Any) -> int | None:
            d = _arg(list(user.args), dict(user.kwargs), 1, "dim", None)
            d = d[0] if isinstance(d, (list, tuple)) and len(d) == 1 else d
            return int(d) % len(self.layout.shape) if isinstance(d, int) else None

        partnered = any(
            user is not node and user.op == "call_function" and _op_name(user) in _REDUCTIONS
            and ("minimum" if _op_name(user) in ("min", "amin") else "maximum") != kind and axis_of(user) == dim
            for user in data.users
        )
        key = (data, dim)
        if partnered:
            if key not in self.comparators:
                self.comparators[key] = self.graph.group_extrema(self.builder.current, groups,
                                                                 ["maximum", "minimum"], where)
            current = self.comparators[key][kind]
        else:
            current = self.graph.group_extrema(self.builder.current, groups, [kind], where)[kind]
        if name in ("max", "min"):
            self.with_indices.add(node)
        val = node.meta.get("val")
        recorded = tuple(int(d) for d in (val[0] if isinstance(val, (tuple, list)) else val).shape)
        self.tensors[node] = (current, Layout(recorded))

    def extremum(self, node: Any, name: str, data: list, where: str) -> None:
        """Elementwise maximum / minimum of two computed tensors. When the program takes both of the same
        pair (MaxMin written as max(a, b), min(a, b)), the pair is one comparator (`Graph.groupsort`),
        whose LipSDP-NSR constraints hold it exactly; a lone one is a max pool of pairs."""
        first, second = data
        shape = self.tensors[first][1].shape
        if self.tensors[second][1].shape != shape or _shape_of(node) != shape:
            raise UnsupportedLayerError(f"{self.source}: {where} takes the {name} of tensors of different shapes")
        other = "minimum" if name == "maximum" else "maximum"
        partnered = any(
            user is not node and user.op == "call_function" and _op_name(user) == other
            and set(self.data_args(user)) == {first, second} for user in first.users
        )
        key = frozenset((first, second))
        if not partnered:
            result = self.graph.extrema(self.plain(first, where), self.plain(second, where), [name], where)[name]
        else:
            if key not in self.comparators:
                self.comparators[key] = self.graph.extrema(self.plain(first, where), self.plain(second, where),
                                                           ["maximum", "minimum"], where)
            result = self.comparators[key][name]
        self.tensors[node] = (result, Layout(shape))


def _nodes_in(value: Any, nodes: set[Any]) -> list[Any]:
    """The members of `nodes` among the (nested) arguments `value`, with repetitions."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes_in(v, nodes)]
    return [value] if hasattr(value, "users") and value in nodes else []


def _needs_graph(program: Any, start: Any) -> bool:
    """True when the program is not a chain from `start` (the user input): a computed tensor read by several
    nodes (or also returned), a node reading two computed tensors, concatenation or max pooling."""
    data = {start}
    readers: dict[Any, int] = {}
    for node in program.graph.nodes:
        if node.op not in ("call_function", "output"):
            continue
        found = _nodes_in((node.args, node.kwargs), data)
        if not found or (node.op == "call_function" and _op_name(node) == "_assert_tensor_metadata"):
            continue
        name = _op_name(node) if node.op == "call_function" else "output"
        if len(found) > 1 or name in _MAX_POOLS | _SORTS | _REDUCTIONS | _EXTREMA | _PICKS | {"cat", "stack"}:
            return True
        data.add(node)
        readers[found[0]] = readers.get(found[0], 0) + 1
    return any(count > 1 for count in readers.values())


def _is_relu_clamp(name: str, args: list, kwargs: dict) -> bool:
    """clamp(x, min=0) with no upper limit is exactly relu(x)."""
    low = _arg(args, kwargs, 1, "min", None)
    high = None if name == "clamp_min" else _arg(args, kwargs, 2, "max", None)
    return high is None and low is not None and not hasattr(low, "shape") and float(low) == 0.0


def _arg(args: list, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    values = [int(v) for v in value]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def from_exported(program: Any, *, source: str = "exported program") -> Network:
    """Read an `ExportedProgram` into a Network (float64 copies of its weights): a chain directly, a graph
    that branches or max-pools through `lipsdp.graph` (the exact lowering to a chain).

    The input tensor of the program (its recorded example shape, batch dimension included) is the network's
    input, flattened in C order. Raises UnsupportedLayerError naming the first node that is not part of a
    chain of supported ops (see SUPPORTED_OPS).
    """
    import torch

    if any(not isinstance(d, int) for n in program.graph.nodes if n.op == "placeholder"
           for d in getattr(n.meta.get("val"), "shape", ())):
        program = _static_batch_of_one(program, source)
    with torch.no_grad():
        chain = _ExportChain(program, source)
        if _needs_graph(program, chain.current):
            return _ExportGraph(program, source).walk(program)
        return chain.walk(program)


def _static_batch_of_one(program: Any, source: str) -> Any:
    """Re-export a program with a dynamic batch dimension on one example with batch size 1."""
    import torch

    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in
              {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}]
    if len(inputs) != 1:
        raise UnsupportedLayerError(f"{source}: the model takes {len(inputs)} inputs; lipsdp reads one")
    val = inputs[0].meta["val"]
    dims = list(val.shape)
    if any(not isinstance(d, int) for d in dims[1:]):
        raise UnsupportedLayerError(
            f"{source}: the input has dynamic sizes {tuple(dims)} besides the batch dimension; export with a "
            "static example input"
        )
    example = torch.zeros((1, *dims[1:]), dtype=val.dtype)
    try:
        return torch.export.export(program.module(), (example,))
    except Exception as exc:  # noqa: BLE001 - export raises many types
        raise UnsupportedLayerError(
            f"{source}: could not fix the dynamic batch dimension to 1 ({type(exc).__name__}: {exc})"[:600]
        ) from None


def from_module(model: Any, *, input_shape: tuple[int, ...] | None = None) -> Network:
    """Export `model` with torch.export (eval mode, one example of `input_shape`, batch of one) and read it.

    `input_shape` is one sample's shape without the batch dimension, e.g. (1, 28, 28); when it is omitted
    and the first layer with parameters is an nn.Linear, its in_features is used.
    """
    import torch

    shape = _example_shape(model, input_shape)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, (torch.zeros((1, *shape), dtype=dtype),))
    except Exception as exc:  # noqa: BLE001 - tracing raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedLayerError(
            f"torch.export could not trace {type(model).__name__} on an input of shape {(1, *shape)} "
            f"({type(exc).__name__}: {first})"[:700]
            + "; lipsdp reads models whose forward is a fixed chain of layers (no data-dependent control flow); "
            "check input_shape"
        ) from None
    finally:
        model.train(was_training)
    return from_exported(program, source=f"torch model {type(model).__name__}")


def _example_shape(model: Any, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    from torch import nn

    if input_shape is not None:
        shape = tuple(int(v) for v in input_shape)
        if not shape or any(v < 1 for v in shape):
            raise ModelLoadError(f"input_shape must be positive sizes such as (C, H, W), got {input_shape}")
        return shape
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    kind = type(first).__name__ if first is not None else "no layer with parameters"
    raise ModelLoadError(
        f"cannot tell the input shape of {type(model).__name__} (its first layer is {kind}); pass "
        "input_shape=(C, H, W) or (features,), one sample without the batch dimension"
    )


# -- .pt2 files ---------------------------------------------------------------------------------------
_MAX_MEMBERS = 100_000


def _check_pt2_archive(path: Path) -> None:
    """Refuse .pt2 archives whose loading would unpickle arbitrary objects or load compiled code."""
    where = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{where}: not a torch.export archive ({type(exc).__name__}: {exc})") from None
    with archive:
        names = archive.namelist()
        if len(names) > _MAX_MEMBERS:
            raise ModelLoadError(f"{where}: {len(names)} archive members; not a torch.export file lipsdp reads")
        prefixes = {n.split("/", 1)[0] for n in names if "/" in n}
        if len(prefixes) != 1 or not any(n.endswith("/archive_version") for n in names):
            raise ModelLoadError(
                f"{where}: not a torch.export.save archive (or an old format that is loaded by unpickling); "
                "save the program again with torch.export.save"
            )
        prefix = prefixes.pop() + "/"
        inner = [n[len(prefix):] for n in names]
        if any(n.startswith("data/aotinductor/") for n in inner):
            raise ModelLoadError(f"{where}: holds compiled AOTInductor code; lipsdp does not load binaries")
        models = [n for n in inner if n.startswith("models/") and n.endswith(".json")]
        if len(models) != 1:
            raise ModelLoadError(f"{where}: holds {len(models)} exported programs; lipsdp reads files with one")
        model = models[0][len("models/"):-len(".json")]
        for legacy in (f"data/weights/{model}.pt", f"data/constants/{model}.pt"):
            if legacy in inner:
                raise ModelLoadError(f"{where}: uses the legacy pickled weights format; save it again")
        for kind in ("weights", "constants"):
            config_name = f"{prefix}data/{kind}/{model}_{kind}_config.json"
            if config_name not in names:
                raise ModelLoadError(f"{where}: the archive has no {kind} table; save it again with torch.export.save")
            try:
                config = json.loads(archive.read(config_name)).get("config", {})
            except (ValueError, AttributeError, zipfile.BadZipFile) as exc:
                raise ModelLoadError(f"{where}: unreadable {kind} table ({exc})") from None
            for fqn, meta in config.items():
                path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
                if not isinstance(meta, dict) or meta.get("use_pickle") or meta.get("tensor_meta") is None or (
                    kind == "constants" and not path_name.startswith("tensor_")
                ):
                    raise ModelLoadError(
                        f"{where}: {kind[:-1]} '{fqn}' is stored as a pickled or custom object; lipsdp loads only "
                        "plain tensors (loading pickles can run code)"
                    )
        sample = f"{prefix}data/sample_inputs/{model}.pt"
        if sample in names:
            import torch

            try:  # torch.export.load would fall back to a full unpickler if this failed
                torch.load(io.BytesIO(archive.read(sample)), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - the restricted unpickler raises many types
                raise ModelLoadError(
                    f"{where}: its sample inputs are not plain tensors ({type(exc).__name__}); refusing to unpickle"
                ) from None


def load_pt2(path: str | Path, *, input_shape: tuple[int, ...] | None = None, **_: Any) -> Network:
    """Read a `torch.export.save` file (.pt2) whose graph is a chain (see `from_exported`).

    Archives that would need unpickling or compiled code to load are refused before torch reads them.
    `input_shape` is not needed (the program records its input shape) and is only checked.
    """
    import torch

    path = Path(path)
    _check_pt2_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - deserialisation raises many types
        raise ModelLoadError(f"{path}: torch.export.load failed ({type(exc).__name__}: {exc})"[:600]) from None
    if not isinstance(program, torch.export.ExportedProgram):
        raise ModelLoadError(f"{path}: holds no exported program")
    net = from_exported(program, source=str(path))
    if input_shape is not None and math.prod(int(v) for v in input_shape) != net.sizes[0]:
        raise ModelLoadError(f"{path}: input_shape {tuple(input_shape)} does not match the program's input "
                             f"({net.sizes[0]} values)")
    return net

