"""Slope bounds [alpha, beta] of the supported activations.

An activation phi is slope-restricted on [alpha, beta] when
alpha <= (phi(a) - phi(b)) / (a - b) <= beta for all a != b. LipSDP only needs these two numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

    def slope_vectors(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-neuron slope bounds (alpha, beta) of a hidden layer of n neurons with this activation."""
        return np.full(n, self.alpha), np.full(n, self.beta)


@dataclass(frozen=True)
class Mixed(Activation):
    """A hidden layer whose neurons `identity` (sorted indices) pass their pre-activation through unchanged
    and whose other neurons apply `base`; the layer has `size` neurons.

    Lowered graphs (`lipsdp.graph`) carry values to later layers this way: x = identity(x) exactly, with
    slope bounds [1, 1] beside the [alpha, beta] of `base`. `alpha` and `beta` are the layer-wide hull;
    `slope_vectors` gives the exact per-neuron bounds. Build one with `mixed(base, identity, size)`.
    """

    base: Activation | None = None
    identity: tuple[int, ...] = ()
    size: int = 0

    def label(self) -> str:
        return self.name

    def slope_vectors(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n != self.size:
            raise InvalidNetworkError(f"a {self.name} activation of {self.size} neurons is given a layer of {n}")
        alpha, beta = np.full(n, self.base.alpha), np.full(n, self.base.beta)
        alpha[list(self.identity)] = 1.0
        beta[list(self.identity)] = 1.0
        return alpha, beta

    def mask(self) -> np.ndarray:
        """Boolean mask of the pass-through (identity) neurons."""
        out = np.zeros(self.size, dtype=bool)
        out[list(self.identity)] = True
        return out

    def select(self, keep: np.ndarray) -> Activation:
        """The activation of the neurons `keep` (a boolean mask or increasing indices) of this layer."""
        mask = self.mask()[np.asarray(keep)]
        return mixed(self.base, np.flatnonzero(mask), int(mask.size))


@dataclass(frozen=True)
class Reflect(Activation):
    """A hidden layer whose neurons `flip` (sorted indices) apply |x| and whose others pass x through; the
    layer has `size` neurons. Every neuron is declared slope-restricted in [-1, 1], except the pass-through
    neurons `identity` (values carried past the layer, e.g. a residual connection), declared [1, 1].

    The norm-preserving activations lower to this (`lipsdp.graph`): MaxMin(a, b) = ((a + b) + |a - b|) / 2,
    ((a + b) - |a - b|) / 2, so a pair needs one identity neuron for a + b and one |.| neuron for a - b; a
    Householder reflection, GroupSort's comparators likewise. Proof obligation: |.| and the identity both
    satisfy -1 <= (phi(a) - phi(b)) / (a - b) <= 1, so [-1, 1] is a valid slope bound for each neuron.
    Why [-1, 1] and not [1, 1] for the identity neurons: the [1, 1] constraint, -(s - t)^2 >= 0, reaches
    the exact constant of a norm-preserving layer only as its multiplier grows without bound, while the
    [-1, 1] constraint t^2 - s^2 >= 0 holds it with a finite one. With every neuron in [-1, 1] the LMI of
    such a layer is LipSDP-NSR's (Pauli et al., ICLR 2024): in the rotated coordinates (a + b, a - b) their
    MaxMin multiplier lambda_1 I + lambda_2 11' is diagonal, one entry per neuron. A value merely carried
    past the layer keeps [1, 1]: a residual sum h + MaxMin(W h) needs its skip path to be the identity, not
    any 1-Lipschitz map. Build one with `reflect(flip, size, identity)`.
    """

    flip: tuple[int, ...] = ()
    size: int = 0
    identity: tuple[int, ...] = ()

    def label(self) -> str:
        return self.name

    def slope_vectors(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n != self.size:
            raise InvalidNetworkError(f"a {self.name} activation of {self.size} neurons is given a layer of {n}")
        alpha = np.full(n, -1.0)
        alpha[list(self.identity)] = 1.0
        return alpha, np.full(n, 1.0)

    def mask(self) -> np.ndarray:
        """Boolean mask of the |.| neurons."""
        out = np.zeros(self.size, dtype=bool)
        out[list(self.flip)] = True
        return out

    def select(self, keep: np.ndarray) -> Activation:
        """The activation of the neurons `keep` (a boolean mask or increasing indices) of this layer."""
        passing = np.zeros(self.size, dtype=bool)
        passing[list(self.identity)] = True
        keep = np.asarray(keep)
        return reflect(np.flatnonzero(self.mask()[keep]), int(self.mask()[keep].size), np.flatnonzero(passing[keep]))


def _indices(values, size: int, what: str) -> tuple[int, ...]:
    idx = tuple(sorted({int(i) for i in np.asarray(values, dtype=np.int64).reshape(-1)}))
    if idx and (idx[0] < 0 or idx[-1] >= size):
        raise InvalidNetworkError(f"{what} neuron indices must lie in 0..{size - 1}")
    return idx


def reflect(flip, size: int, identity=()) -> Reflect:
    """|x| on the neurons `flip` (indices) of a layer of `size`, the identity on the others, all in [-1, 1]
    but the pass-through neurons `identity` ([1, 1])."""
    flips, passing = _indices(flip, size, "reflected"), _indices(identity, size, "pass-through")
    if set(flips) & set(passing):
        raise InvalidNetworkError("a neuron cannot both reflect (|x|) and pass its value through")
    return Reflect("reflect", -1.0, 1.0, None, flips, int(size), passing)


@dataclass(frozen=True)
class GroupSort(Activation):
    """Sorting within groups of `group` consecutive neurons (not elementwise): `maxmin` is group 2 in
    descending order, (a, b) -> (max, min); `groupsort:g` sorts each group ascending (torch.sort's order).

    It is 1-Lipschitz (a permutation on each linear piece) and is not a per-neuron activation, so a chain
    `Network` cannot hold it: the loaders build a `lipsdp.graph.Graph` and lower it (to `Reflect` layers)."""

    descending: bool = False

    def label(self) -> str:
        return "maxmin" if self.descending and self.param == 2 else f"groupsort({self.param:g})"


def mixed(base: Activation, identity, size: int) -> Activation:
    """`base` on every neuron of a layer of `size` except the pass-through neurons `identity` (indices).

    Returns `base` itself when no neuron passes through, and the identity when every neuron does."""
    idx = tuple(sorted({int(i) for i in np.asarray(identity, dtype=np.int64).reshape(-1)}))
    if idx and (idx[0] < 0 or idx[-1] >= size):
        raise InvalidNetworkError(f"pass-through neuron indices must lie in 0..{size - 1}")
    if not idx or base.name == "identity":
        return base
    if len(idx) == size:
        return activation("identity")
    if isinstance(base, Mixed) or "+" in base.name:
        raise InvalidNetworkError(f"a layer with pass-through neurons needs a plain activation, not {base.name}")
    return Mixed(f"{base.label()}|identity", min(base.alpha, 1.0), max(base.beta, 1.0), None, base, idx, int(size))


def select_neurons(act: Activation, keep: np.ndarray) -> Activation:
    """The activation of the kept neurons of a layer (`Mixed` and `Reflect` layers depend on which)."""
    return act.select(keep) if isinstance(act, (Mixed, Reflect)) else act


def neuron_mask(act: Activation) -> np.ndarray | None:
    """The neurons of a layer that do not apply its base activation: a `Mixed` layer's pass-through
    neurons, a `Reflect` layer's |.| neurons; None for a plain activation."""
    return act.mask() if isinstance(act, (Mixed, Reflect)) else None


SUPPORTED = ("relu", "tanh", "sigmoid", "leaky_relu", "elu", "softplus", "identity", "abs", "maxmin",
             "groupsort")


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
    if key == "abs":
        return Activation("abs", -1.0, 1.0)
    if key == "maxmin":
        return GroupSort("groupsort", -1.0, 1.0, 2.0, True)
    if key == "groupsort":
        size = 2.0 if param is None else float(param)
        if size != int(size) or size < 2:
            raise InvalidNetworkError(f"groupsort needs a group size >= 2 as 'groupsort:4', got {param}")
        return GroupSort("groupsort", -1.0, 1.0, size, False)
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
        "(leaky_relu and elu take a parameter as 'leaky_relu:0.1', groupsort its group size as 'groupsort:4')"
    )
