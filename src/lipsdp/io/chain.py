"""Assembling a `Network` from a chain of affine maps and elementwise activations (shared by the torch
and ONNX loaders).

Consecutive affine maps (Linear, unrolled Conv, AvgPool, folded BatchNorm, Flatten, constant Add/Mul) are
composed into one matrix, exactly: a batch-norm folds into the affine layer before it, or, when it follows
an activation, into the one after it. Two affine maps whose product would be larger than the pair stay
separate, joined by the identity activation (slopes alpha = beta = 1, exact in LipSDP).
"""

from __future__ import annotations

import numpy as np

from lipsdp.activations import Activation, GroupSort, activation
from lipsdp.errors import LipSDPError, ModelLoadError, UnsupportedLayerError
from lipsdp.graph import Graph, to_network
from lipsdp.network import Network
from lipsdp.weights import is_sparse, nonzeros, scale_columns, scale_rows, stored

# Largest array a loader accepts (2^28 float64 = 2 GiB); a file may claim any shape in a few bytes.
MAX_ARRAY_ELEMENTS = 2**28


def named_activations(source: str, activations, override: str | None):
    """`activation=` given by the caller: the hidden activation of a file that does not record one (the
    MaxMin nets of Pauli et al. store only `W`). A file that names its activations must agree with it."""
    if override is None:
        return activations
    if activations is not None and activations != override and activations != [override] * len(activations):
        raise ModelLoadError(f"{source}: the file names its activations {activations}; --activation {override} "
                             "disagrees (leave it out for this file)")
    return override


def build_from_arrays(source: str, weights: list[np.ndarray], biases, activations) -> Network:
    """`Network.from_arrays`, with the file name in front of any error message. Hidden layers with a
    GroupSort / MaxMin activation (not elementwise) go through `lipsdp.graph` and its exact lowering."""
    try:
        hidden = len(weights) - 1
        names = [activations] * hidden if isinstance(activations, (str, Activation)) else list(activations)
        acts = [a if isinstance(a, Activation) else activation(a) for a in names]
        if len(acts) != hidden or not any(isinstance(a, GroupSort) for a in acts):
            return Network.from_arrays(weights, activations, biases)
        probe = Network.from_arrays(weights, "identity", biases)  # validates shapes and values
        graph = Graph(probe.sizes[0], where=source)
        node = 0
        for k, (w, b) in enumerate(zip(probe.weights, probe.biases)):
            node = graph.affine(node, w, b, where=f"layer {k}")
            if k < hidden:
                node = graph.activation(node, acts[k], where=f"hidden layer {k + 1}")
        return to_network(graph)
    except LipSDPError as exc:
        raise type(exc)(f"{source}: {exc}") from None


def compose_activations(first: Activation, second: Activation) -> Activation:
    """Two activations in a row: slopes multiply (both are monotone, alpha >= 0)."""
    return Activation(f"{first.label()}+{second.label()}", first.alpha * second.alpha, first.beta * second.beta)


class _Affine:
    """x -> w x + b, where a 1-D `w` stands for diag(w) (kept lazy: batch-norms of conv layers are big)."""

    def __init__(self, w: np.ndarray, b: np.ndarray, op: object = None) -> None:
        self.w = w if is_sparse(w) else np.asarray(w, dtype=np.float64)
        self.b = np.array(b, dtype=np.float64).reshape(-1)
        self.op = op  # the structured operator whose matrix w is (a composition has none)

    @property
    def n_out(self) -> int:
        return self.w.shape[0]

    @property
    def n_in(self) -> int:
        return self.w.shape[-1]

    def then(self, nxt: _Affine) -> _Affine | None:
        """The composition nxt(self(x)), or None when the product matrix would outgrow the two factors (a
        CSR factor, `lipsdp.weights`: its nonzeros count)."""
        a, b = self.w, nxt.w
        if a.ndim == 1 and b.ndim == 1:
            w = b * a
        elif a.ndim == 1:
            w = scale_columns(b, a)
        elif b.ndim == 1:
            w = scale_rows(a, b)
        elif is_sparse(a) and is_sparse(b):
            w = stored(b @ a)
            if nonzeros(w) > a.size + b.size:
                return None
        elif b.shape[0] * a.shape[1] <= a.size + b.size:
            w = b @ a
        else:
            return None
        bias = (b * self.b if b.ndim == 1 else b @ self.b) + nxt.b
        return _Affine(w, bias)

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.diag(self.w) if self.w.ndim == 1 else self.w), self.b


class ChainBuilder:
    """Collects affine maps and activations in execution order; `build()` returns the Network."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.layers: list[_Affine] = []  # closed affine layers, each followed by acts[k]
        self.acts: list[Activation] = []
        self.current: _Affine | None = None  # affine maps since the last activation
        self.pending: Activation | None = None  # activation(s) after `current`
        self.size: int | None = None  # current feature count

    def affine(self, w: np.ndarray, b: np.ndarray | None, where: str, operator: object = None) -> None:
        """Append x -> w x + b (w 2-D dense or CSR, or 1-D for a diagonal map; `operator`: w's structured form)."""
        w = w if is_sparse(w) else np.asarray(w, dtype=np.float64)
        b = np.zeros(w.shape[0]) if b is None else np.broadcast_to(np.asarray(b, dtype=np.float64), (w.shape[0],))
        step = _Affine(w, b, operator)
        if self.size is not None and step.n_in != self.size:
            raise UnsupportedLayerError(
                f"{self.source}: {where} expects {step.n_in} input features but receives {self.size}"
            )
        if self.pending is not None:
            if self.current is None:
                raise UnsupportedLayerError(
                    f"{self.source}: the network starts with an activation before its first affine layer "
                    f"({where} is the first affine one); lipsdp needs the chain to start with an affine layer"
                )
            self.layers.append(self.current)
            self.acts.append(self.pending)
            self.current, self.pending = step, None
        elif self.current is None:
            self.current = step
        else:
            merged = self.current.then(step)
            if merged is None:
                self.layers.append(self.current)
                self.acts.append(activation("identity"))
                self.current = step
            else:
                self.current = merged
        self.size = step.n_out

    def activation(self, act: Activation) -> None:
        """Append an elementwise activation."""
        self.pending = act if self.pending is None else compose_activations(self.pending, act)

    @property
    def empty(self) -> bool:
        return self.current is None and not self.layers

    def build(self) -> Network:
        """The Network; a trailing activation becomes a hidden layer followed by the identity map."""
        if self.current is None:
            raise UnsupportedLayerError(f"{self.source}: the model has no affine (Linear/Gemm/Conv) layer")
        layers, acts = list(self.layers), list(self.acts)
        layers.append(self.current)
        if self.pending is not None:
            # Exact, and LipSDP then uses the final activation's slope bounds.
            acts.append(self.pending)
            layers.append(_Affine(np.ones(self.current.n_out), np.zeros(self.current.n_out)))
        weights, biases = zip(*(layer.dense() for layer in layers))
        return Network.from_arrays(list(weights), acts, list(biases), [layer.op for layer in layers])


class GraphBuilder:
    """The `ChainBuilder` interface (`affine`, `activation`, `size`) appending to a `lipsdp.graph.Graph`
    from node `current`: graph front ends run their chain operations on one branch at a time with it."""

    def __init__(self, graph: Graph, current: int, source: str, where: str = "") -> None:
        self.graph = graph
        self.current = current
        self.source = source
        self.where = where
        self.size = graph.size(current)

    def affine(self, w: np.ndarray, b: np.ndarray | None, where: str, operator: object = None) -> None:
        w = w if is_sparse(w) else np.asarray(w, dtype=np.float64)
        if w.shape[-1] != self.size:
            raise UnsupportedLayerError(
                f"{self.source}: {where} expects {w.shape[-1]} input features but receives {self.size}"
            )
        self.current = self.graph.affine(self.current, w, b, where, operator)
        self.size = self.graph.size(self.current)

    def activation(self, act: Activation) -> None:
        self.current = self.graph.activation(self.current, act, self.where)
