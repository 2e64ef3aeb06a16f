"""PyTorch modules -> Network: an `nn.Sequential` (or a plain chain of modules) of affine layers and
elementwise activations."""

from __future__ import annotations

from typing import Any

import numpy as np

from lipsdp.activations import Activation, activation
from lipsdp.errors import UnsupportedLayerError
from lipsdp.network import Network

SUPPORTED_MODULES = "Linear, ReLU, LeakyReLU, Tanh, Sigmoid, ELU, Softplus, Identity, Flatten, Dropout"


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


def _compose(first: Activation, second: Activation) -> Activation:
    """Two activations in a row: slopes multiply (both are monotone, alpha >= 0)."""
    return Activation(f"{first.label()}+{second.label()}", first.alpha * second.alpha, first.beta * second.beta)


def flatten_modules(model: Any) -> list[Any]:
    """The leaf modules of a (nested) Sequential in execution order."""
    from torch import nn

    if isinstance(model, nn.Sequential):
        out = []
        for child in model:
            out.extend(flatten_modules(child))
        return out
    return [model]


def from_torch(model: Any, **_: Any) -> Network:
    """Convert a torch chain of Linear layers and activations (eval semantics: Dropout is the identity)."""
    from torch import nn

    modules = flatten_modules(model)
    weights: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    acts: list[Activation] = []
    pending: Activation | None = None
    for index, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            if weights:
                acts.append(pending or activation("identity"))
            elif pending is not None:
                raise UnsupportedLayerError(
                    f"module {index} ({type(module).__name__}): the network starts with an activation before "
                    "its first Linear layer; lipsdp needs the chain to start with an affine layer"
                )
            pending = None
            weights.append(module.weight.detach().cpu().double().numpy().copy())
            bias = module.bias
            biases.append(
                np.zeros(module.out_features) if bias is None else bias.detach().cpu().double().numpy().copy()
            )
            continue
        act = _activation_of(module)
        if act is not None:
            pending = act if pending is None else _compose(pending, act)
            continue
        if isinstance(module, (nn.Identity, nn.Dropout, nn.Flatten)):
            continue
        raise UnsupportedLayerError(
            f"module {index} ({type(module).__name__}) is not supported; lipsdp reads chains of {SUPPORTED_MODULES}"
        )
    if not weights:
        raise UnsupportedLayerError(f"the torch model has no Linear layer; supported modules: {SUPPORTED_MODULES}")
    if pending is not None:
        # A final activation (e.g. tanh on a controller's output) becomes a hidden layer followed by the
        # identity map: exact, and LipSDP then uses its slope bounds.
        acts.append(pending)
        weights.append(np.eye(weights[-1].shape[0]))
        biases.append(np.zeros(weights[-1].shape[0]))
    return Network.from_arrays(weights, acts, biases)
