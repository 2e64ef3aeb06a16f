"""Slope bounds [alpha, beta] of the supported activations.

An activation phi is slope-restricted on [alpha, beta] when
alpha <= (phi(a) - phi(b)) / (a - b) <= beta for all a != b. LipSDP only needs these two numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lipsdp.errors import InvalidNetworkError


@dataclass(frozen=True)
class Activation:
    """A named activation with its slope bounds; `param` is e.g. the leaky-ReLU negative slope."""

    name: str
    alpha: float
    beta: float
    param: float | None = None

    @property
    def lipschitz(self) -> float:
        """The activation's own Lipschitz constant, max(|alpha|, |beta|)."""
        return max(abs(self.alpha), abs(self.beta))

    def label(self) -> str:
        return self.name if self.param is None else f"{self.name}({self.param:g})"


SUPPORTED = ("relu", "tanh", "sigmoid", "leaky_relu", "elu", "softplus", "identity")


def activation(name: str, param: float | None = None) -> Activation:
    """Look up an activation by name ('relu', 'leaky_relu:0.1', 'elu:1.0', ...)."""
    key = name.strip().lower().replace("-", "_")
    if ":" in key:
        key, _, raw = key.partition(":")
        try:
            param = float(raw)
        except ValueError:
            raise InvalidNetworkError(f"activation '{name}': parameter '{raw}' is not a number") from None
    aliases = {"leakyrelu": "leaky_relu", "linear": "identity", "none": "identity"}
    key = aliases.get(key, key)
    if key == "relu":
        return Activation("relu", 0.0, 1.0)
    if key == "tanh":
        return Activation("tanh", 0.0, 1.0)
    if key == "sigmoid":
        return Activation("sigmoid", 0.0, 0.25)
    if key == "softplus":
        return Activation("softplus", 0.0, 1.0)
    if key == "identity":
        return Activation("identity", 1.0, 1.0)
    if key == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        if not 0.0 <= slope <= 1.0:
            raise InvalidNetworkError(f"leaky_relu negative slope must be in [0, 1], got {slope}")
        return Activation("leaky_relu", slope, 1.0, slope)
    if key == "elu":
        scale = 1.0 if param is None else float(param)
        if scale < 0:
            raise InvalidNetworkError(f"elu alpha must be >= 0, got {scale}")
        # elu'(x) = 1 for x > 0 and scale * exp(x) in (0, scale) for x < 0.
        return Activation("elu", 0.0, max(1.0, scale), scale)
    raise InvalidNetworkError(
        f"unknown activation '{name}'; supported: {', '.join(SUPPORTED)} "
        "(leaky_relu and elu take a parameter as 'leaky_relu:0.1')"
    )
