"""PyTorch modules -> Network: an `nn.Sequential` (or a plain chain of modules) of affine layers and
elementwise activations. Any other module (a custom `forward`) goes through `torch_export`, which reads
the ATen graph of `torch.export.export`; this module-by-module path is the fast path for nn.Sequential.

Affine layers: Linear, Conv2d and AvgPool2d (unrolled to matrices on the C-order flattened input; they
need `input_shape=(C, H, W)`), BatchNorm1d/2d (eval semantics: running statistics, folded into the
neighbouring affine layer), Flatten/Unflatten, Identity, Dropout (the identity at evaluation). A Sequential
with MaxPool2d or padding modules is read through `torch_export` (max pooling is lowered by `lipsdp.graph`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lipsdp.activations import Activation, activation
from lipsdp.conv import Conv2d
from lipsdp.errors import ModelLoadError, UnsupportedLayerError
from lipsdp.io.chain import ChainBuilder
from lipsdp.network import Network
from lipsdp.unroll import avgpool2d_matrix

SUPPORTED_MODULES = (
    "Linear, Conv2d, AvgPool2d, AdaptiveAvgPool2d (divisible sizes), BatchNorm1d, BatchNorm2d, Flatten, "
    "Unflatten, ReLU, LeakyReLU, Tanh, Sigmoid, ELU, Softplus, Identity, Dropout"
)

_HINTS = {
    "MaxPool": "only 2-D max pooling (MaxPool2d) is supported",
    "Attention": "attention (products of activations) has no global Lipschitz constant LipSDP can bound",
    "Softmax": "drop the final softmax: bound the logits (certified radii use logit margins)",
    "LayerNorm": "layer normalisation is not an affine map of the input; it cannot be folded",
}


def _graph_modules() -> tuple[type, ...]:
    from torch import nn

    return (nn.MaxPool2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
            nn.ReplicationPad1d, nn.ReplicationPad2d, nn.CircularPad1d, nn.CircularPad2d)


def _activation_of(module: Any) -> Activation | None:
    from torch import nn

    if isinstance(module, nn.ReLU):
        return activation("relu")
    if isinstance(module, nn.LeakyReLU):
        return activation("leaky_relu", module.negative_slope)
    if isinstance(module, nn.Tanh):
        return activation("tanh")
    if isinstance(module, nn.Sigmoid):
        return activation("sigmoid")
    if isinstance(module, nn.ELU):
        return activation("elu", module.alpha)
    if isinstance(module, nn.Softplus):
        if float(module.beta) != 1.0:
            # softplus(beta x) / beta has the same slope bounds but a different forward map, which the
            # lower bound and Network.forward would get wrong.
            raise UnsupportedLayerError(
                f"Softplus(beta={module.beta:g}) is not supported, only beta=1; fold beta into the "
                "neighbouring Linear layers (softplus(beta x) / beta)"
            )
        return activation("softplus")
    return None


def flatten_modules(model: Any) -> list[Any]:
    """The leaf modules of a (nested) Sequential in execution order."""
    from torch import nn

    if isinstance(model, nn.Sequential):
        out = []
        for child in model:
            out.extend(flatten_modules(child))
        return out
    return [model]


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().cpu().double().numpy().copy()


def _unsupported(index: int, module: Any) -> UnsupportedLayerError:
    from torch import nn

    name = type(module).__name__
    hint = next((h for key, h in _HINTS.items() if key in name), None)
    if hint is None and not isinstance(module, nn.Sequential) and len(list(module.children())) > 0:
        hint = (
            "it is a composite torch.nn module whose forward() is not a chain of the layers below (residual "
            "connections and other branching graphs are not supported yet)"
        )
    hint = f": {hint}" if hint else ""
    return UnsupportedLayerError(
        f"module {index} ({name}) is not supported{hint}. lipsdp reads chains of {SUPPORTED_MODULES}"
    )


class _TorchChain:
    """Walks the leaf modules, tracking the per-sample shape, and feeds a ChainBuilder."""

    def __init__(self, input_shape: tuple[int, ...] | None) -> None:
        self.builder = ChainBuilder("torch model")
        self.shape = None if input_shape is None else tuple(int(v) for v in input_shape)
        if self.shape is not None and (not self.shape or any(v < 1 for v in self.shape)):
            raise ModelLoadError(f"input_shape must be positive sizes such as (C, H, W), got {input_shape}")
        if self.shape is not None:
            self.builder.size = math.prod(self.shape)

    def image_shape(self, index: int, module: Any) -> tuple[int, int, int]:
        name = type(module).__name__
        if self.shape is None:
            raise UnsupportedLayerError(
                f"module {index} ({name}) needs the input image shape to be unrolled into a matrix: pass "
                "input_shape=(C, H, W), e.g. lipsdp.estimate(model, input_shape=(1, 28, 28))"
            )
        if len(self.shape) != 3:
            raise UnsupportedLayerError(
                f"module {index} ({name}) needs a (C, H, W) input but receives shape {self.shape}"
            )
        return self.shape  # type: ignore[return-value]

    def add(self, index: int, module: Any) -> None:
        from torch import nn

        name = f"module {index} ({type(module).__name__})"
        b = self.builder
        if isinstance(module, nn.Linear):
            if self.shape is not None and len(self.shape) != 1:
                raise UnsupportedLayerError(
                    f"{name} receives a tensor of shape {self.shape}; add nn.Flatten() before it"
                )
            bias = None if module.bias is None else _numpy(module.bias)
            b.affine(_numpy(module.weight), bias, name)
            self.shape = (module.out_features,)
        elif isinstance(module, nn.Conv2d):
            shape = self.image_shape(index, module)
            if module.padding_mode != "zeros":
                raise UnsupportedLayerError(f"{name}: padding_mode='{module.padding_mode}' is not supported, only 'zeros'")
            padding: Any = module.padding
            if padding == "valid":
                padding = 0
            elif padding == "same":
                totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
                padding = (totals[0] // 2, totals[1] // 2, totals[0] - totals[0] // 2, totals[1] - totals[1] // 2)
            op = Conv2d.make(
                _numpy(module.weight), shape, stride=module.stride, padding=padding, dilation=module.dilation,
                groups=module.groups,
            )
            matrix, self.shape = op.matrix(), op.out_shape
            bias = None if module.bias is None else np.repeat(_numpy(module.bias), self.shape[1] * self.shape[2])
            b.affine(matrix, bias, name, op)
        elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            shape = self.image_shape(index, module)
            if isinstance(module, nn.AdaptiveAvgPool2d):
                out = module.output_size
                out = (out, out) if isinstance(out, int) else tuple(shape[1 + i] if o is None else o for i, o in enumerate(out))
                if shape[1] % out[0] or shape[2] % out[1]:
                    raise UnsupportedLayerError(
                        f"{name}: output size {out} does not divide the input size {shape[1:]}; only the "
                        "equal-window case is supported"
                    )
                kernel = (shape[1] // out[0], shape[2] // out[1])
                matrix, self.shape = avgpool2d_matrix(shape, kernel, stride=kernel)
            else:
                matrix, self.shape = avgpool2d_matrix(
                    shape, module.kernel_size, stride=module.stride, padding=module.padding,
                    count_include_pad=module.count_include_pad, divisor_override=module.divisor_override,
                )
                if module.ceil_mode:
                    self._check_ceil(name, shape, module)
            b.affine(matrix, None, name)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.batch_norm(index, module)
        elif isinstance(module, nn.Flatten):
            if self.shape is not None:
                if module.start_dim != 1 or module.end_dim != -1:
                    raise UnsupportedLayerError(f"{name}: only Flatten(start_dim=1, end_dim=-1) is supported")
                self.shape = (math.prod(self.shape),)
        elif isinstance(module, nn.Unflatten):
            if module.dim not in (1, -1) or (self.shape is not None and len(self.shape) != 1):
                raise UnsupportedLayerError(f"{name}: only unflattening a flat feature vector (dim=1) is supported")
            self.shape = tuple(int(v) for v in module.unflattened_size)
        elif isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)):
            pass
        else:
            act = _activation_of(module)
            if act is None:
                raise _unsupported(index, module)
            b.activation(act)

    def _check_ceil(self, name: str, shape: tuple[int, int, int], module: Any) -> None:
        import torch

        with torch.no_grad():
            out = module(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:]
        if tuple(out) != tuple(self.shape):
            raise UnsupportedLayerError(f"{name}: ceil_mode=True with partial windows is not supported")

    def batch_norm(self, index: int, module: Any) -> None:
        from torch import nn

        name = f"module {index} ({type(module).__name__})"
        if module.running_mean is None or module.running_var is None:
            raise UnsupportedLayerError(
                f"{name} has no running statistics (track_running_stats=False), so it is not a fixed affine map"
            )
        var = _numpy(module.running_var)
        scale = 1.0 / np.sqrt(var + float(module.eps))
        if module.weight is not None:
            scale = scale * _numpy(module.weight)
        shift = -_numpy(module.running_mean) * scale
        if module.bias is not None:
            shift = shift + _numpy(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            shape = self.image_shape(index, module)
            scale, shift = np.repeat(scale, shape[1] * shape[2]), np.repeat(shift, shape[1] * shape[2])
        elif self.shape is not None and len(self.shape) != 1:
            raise UnsupportedLayerError(f"{name} receives shape {self.shape}; only (features,) inputs are supported")
        self.builder.affine(scale, shift, name)


def _builtin(module: Any) -> bool:
    """A torch.nn layer whose behaviour lipsdp knows by its type (Sequential: its own forward, not a subclass')."""
    from torch import nn

    if isinstance(module, nn.Sequential):
        return type(module).forward is nn.Sequential.forward
    return type(module).__module__.startswith("torch.nn")


def from_torch(model: Any, *, input_shape: tuple[int, ...] | None = None, **_: Any) -> Network:
    """Convert a torch chain (eval semantics: Dropout is the identity, BatchNorm uses running statistics).

    `input_shape=(C, H, W)` (one sample, no batch dimension) is needed when the chain has Conv2d/AvgPool2d.
    Raises UnsupportedLayerError naming the first module that cannot be read. A custom module (its own
    forward(), or inside the Sequential) is read from its torch.export graph instead (`torch_export`).
    """
    from lipsdp.io.torch_export import from_module

    if not _builtin(model):
        return from_module(model, input_shape=input_shape)
    if any(isinstance(m, _graph_modules()) for m in flatten_modules(model)):  # lowered through lipsdp.graph
        return from_module(model, input_shape=input_shape)
    chain = _TorchChain(input_shape)
    for index, module in enumerate(flatten_modules(model)):
        if not _builtin(module):
            try:
                return from_module(model, input_shape=input_shape)
            except UnsupportedLayerError as exc:
                raise UnsupportedLayerError(
                    f"module {index} ({type(module).__name__}) is a custom module with its own forward(), so the "
                    f"model was read through torch.export: {exc}"
                ) from None
        chain.add(index, module)
    if chain.builder.empty:
        raise UnsupportedLayerError(f"the torch model has no Linear or Conv2d layer; supported modules: {SUPPORTED_MODULES}")
    return chain.builder.build()
