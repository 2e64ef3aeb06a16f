"""The network model every method works on: a chain of affine maps and slope-restricted activations.

f(x) = W_l phi_l(... phi_1(W_0 x + b_0) ...) + b_l.  Hidden layer k (1..l) has activation phi_k with
per-neuron slope bounds alpha_k, beta_k (vectors; usually constant, but local bounds tighten them).
A layer may mix its activation with pass-through neurons (`lipsdp.activations.Mixed`: the identity on
some neurons, slopes [1, 1]); lowered graphs (`lipsdp.graph`) use them to carry skip connections.
A large, mostly-zero weight (an unrolled convolution) is stored as a CSR matrix (`lipsdp.weights`): memory
then grows with the number of nonzeros, not with n_out * n_in. Code that needs dense weights takes
`dense_weights(net)` (the method registry does this for every method not in `methods.SPARSE_AWARE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from lipsdp.activations import Activation, GroupSort, Mixed, Reflect, activation
from lipsdp.errors import InvalidNetworkError
from lipsdp.weights import all_finite, dense, entries, is_sparse, stored


@dataclass(frozen=True)
class Network:
    """Affine maps W_k, b_k and hidden-layer activations with slope bounds.

    Build one with `Network.from_arrays(weights, activations)` or a loader in `lipsdp.io`.
    """

    weights: tuple[np.ndarray, ...]  # dense, or CSR when large and mostly zeros (`lipsdp.weights.stored`)
    biases: tuple[np.ndarray, ...]
    activations: tuple[Activation, ...]
    alphas: tuple[np.ndarray, ...] = field(repr=False)
    betas: tuple[np.ndarray, ...] = field(repr=False)
    # Where a loader knows it: the structured operator a weight came from (e.g. `lipsdp.conv.Conv2d`), one
    # entry per weight or empty. A hint only: methods use one after checking `operator.matches(weight)`,
    # so a transform that changes the weights (and keeps this field) can never make them use a stale one.
    operators: tuple[object | None, ...] = field(default=(), repr=False, compare=False)
    # Set by the loaders for a graph with max pools that factor it (`lipsdp.compose.Composition`): the parts
    # between the pools, bounded one by one. It applies only while `composition.applies_to(self)` holds,
    # i.e. to this very network, never to a network derived from it (those build new weight tuples).
    composition: object | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_arrays(
        cls,
        weights: Sequence[np.ndarray],
        activations: str | Activation | Sequence[str | Activation] = "relu",
        biases: Sequence[np.ndarray | None] | None = None,
        operators: Sequence[object | None] | None = None,
    ) -> Network:
        """Validate and build a network from (n_out, n_in) weight matrices.

        `activations` is one name for every hidden layer or one per hidden layer (len(weights) - 1);
        `operators` optionally names the structured operator of each weight (see the field).
        """
        weights = [w if is_sparse(w) else np.asarray(w) for w in weights]
        if len(weights) == 0:
            raise InvalidNetworkError("the network has no weight matrices; give at least one")
        hidden = len(weights) - 1
        if isinstance(activations, (str, Activation)):
            activations = [activations] * hidden
        activations = list(activations)
        if len(activations) != hidden:
            raise InvalidNetworkError(
                f"{len(weights)} weight matrices need {hidden} hidden-layer activations, got {len(activations)}"
            )
        acts = tuple(a if isinstance(a, Activation) else activation(a) for a in activations)
        for k, act in enumerate(acts):
            if isinstance(act, GroupSort):
                raise InvalidNetworkError(
                    f"hidden layer {k + 1}: {act.label()} is not elementwise; a chain holds it only lowered, "
                    "through lipsdp.graph (the file loaders do this; in code: lipsdp.io.chain.build_from_arrays)"
                )
        if biases is None:
            biases = [None] * len(weights)
        if len(biases) != len(weights):
            raise InvalidNetworkError(f"{len(weights)} weight matrices but {len(biases)} biases")
        ws, bs = [], []
        for k, (w, b) in enumerate(zip(weights, biases)):
            if w.ndim == 1:
                w = w.reshape(1, -1)
            if w.ndim != 2:
                raise InvalidNetworkError(f"layer {k}: weight must be a 2-D (n_out, n_in) matrix, got shape {w.shape}")
            if not np.issubdtype(w.dtype, np.number) or np.iscomplexobj(w):
                raise InvalidNetworkError(f"layer {k}: weight must hold real numbers, got dtype {w.dtype}")
            if entries(w) == 0:
                raise InvalidNetworkError(f"layer {k}: weight matrix is empty (shape {w.shape})")
            w = stored(w)
            if not all_finite(w):
                raise InvalidNetworkError(f"layer {k}: weight matrix contains NaN or infinite values")
            b = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
            if b.shape != (w.shape[0],):
                raise InvalidNetworkError(f"layer {k}: bias has {b.size} entries but the layer has {w.shape[0]} outputs")
            if not np.all(np.isfinite(b)):
                raise InvalidNetworkError(f"layer {k}: bias contains NaN or infinite values")
            if k > 0 and w.shape[1] != ws[-1].shape[0]:
                raise InvalidNetworkError(
                    f"layer {k}: weight takes {w.shape[1]} inputs but layer {k - 1} has {ws[-1].shape[0]} outputs"
                )
            ws.append(w)
            bs.append(b)
        slopes = [acts[k].slope_vectors(ws[k].shape[0]) for k in range(hidden)]  # per neuron (Mixed layers)
        alphas = tuple(a for a, _ in slopes)
        betas = tuple(b for _, b in slopes)
        ops = tuple(operators) if operators is not None and any(op is not None for op in operators) else ()
        if ops and len(ops) != len(ws):
            raise InvalidNetworkError(f"{len(ws)} weight matrices but {len(ops)} operators")
        return cls(tuple(ws), tuple(bs), acts, alphas, betas, ops)

    def operator(self, k: int) -> object | None:
        """The structured operator of weight k when one is recorded and its matrix is exactly that weight."""
        op = self.operators[k] if k < len(self.operators) else None
        matches = getattr(op, "matches", None)
        return op if matches is not None and matches(self.weights[k]) else None

    # -- shape -------------------------------------------------------------------------------
    @property
    def sizes(self) -> list[int]:
        """Layer widths [n_0, n_1, ..., n_l, n_out]."""
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]

    @property
    def depth(self) -> int:
        """Number of hidden layers l (= number of weight matrices - 1)."""
        return len(self.weights) - 1

    @property
    def hidden_sizes(self) -> list[int]:
        return [w.shape[0] for w in self.weights[:-1]]

    @property
    def n_neurons(self) -> int:
        return int(sum(self.hidden_sizes))

    def describe(self) -> str:
        acts = sorted({a.label() for a in self.activations}) or ["none"]
        return f"[{', '.join(map(str, self.sizes))}] ({'/'.join(acts)})"

    # -- evaluation --------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Evaluate the network on inputs x of shape (n_0,) or (batch, n_0)."""
        h = np.asarray(x, dtype=np.float64)
        for k, w in enumerate(self.weights):
            h = h @ w.T + self.biases[k]
            if k < self.depth:
                h = apply_activation(self.activations[k], h)
        return h

    # -- transformations ---------------------------------------------------------------------
    def with_slopes(self, alphas: Sequence[np.ndarray], betas: Sequence[np.ndarray]) -> Network:
        """The same network with tighter per-neuron slope bounds (e.g. valid on an input region)."""
        alphas = tuple(np.asarray(a, dtype=np.float64) for a in alphas)
        betas = tuple(np.asarray(b, dtype=np.float64) for b in betas)
        for k, (a, b) in enumerate(zip(alphas, betas)):
            if a.shape != (self.hidden_sizes[k],) or b.shape != a.shape or np.any(a > b):
                raise InvalidNetworkError(f"hidden layer {k + 1}: slope bounds must be vectors with alpha <= beta")
        return replace(self, alphas=alphas, betas=betas)

    def with_last_weight(self, w_last: np.ndarray, b_last: np.ndarray | None = None) -> Network:
        """The same network with its final affine map replaced (e.g. a class-pair difference row)."""
        w_last = stored(w_last if is_sparse(w_last) else np.atleast_2d(np.asarray(w_last, dtype=np.float64)))
        if w_last.shape[1] != self.weights[-1].shape[1]:
            raise InvalidNetworkError("replacement last layer does not match the last hidden width")
        b = np.zeros(w_last.shape[0]) if b_last is None else np.asarray(b_last, dtype=np.float64)
        return replace(self, weights=self.weights[:-1] + (w_last,), biases=self.biases[:-1] + (b,))

    def split(self, k: int) -> list[Network]:
        """Cut the chain into consecutive pieces of k weight matrices each (the last may be shorter).

        The activation between two pieces is not part of either; multiply by its Lipschitz constant
        (see `boundary_lipschitz`) when combining the pieces' bounds.
        """
        if int(k) != k or k < 1:
            raise InvalidNetworkError(f"split must be a positive integer number of weight matrices, got {k}")
        k = int(k)
        pieces = []
        for start in range(0, len(self.weights), k):
            stop = min(start + k, len(self.weights))
            pieces.append(
                Network(
                    self.weights[start:stop],
                    self.biases[start:stop],
                    self.activations[start : stop - 1],
                    self.alphas[start : stop - 1],
                    self.betas[start : stop - 1],
                )
            )
        return pieces

    def boundary_lipschitz(self, k: int) -> list[float]:
        """Lipschitz constants of the activations sitting between the pieces of `split(k)`."""
        out = []
        for stop in range(k, len(self.weights), k):
            a, b = self.alphas[stop - 1], self.betas[stop - 1]
            out.append(float(max(np.max(np.abs(a)), np.max(np.abs(b)))))
        return out


def dense_weights(net: Network) -> Network:
    """The same network with every weight a dense array (for the code that takes dense weights only)."""
    if not any(is_sparse(w) for w in net.weights):
        return net
    return replace(net, weights=tuple(dense(w) for w in net.weights))


def sparse_weights(net: Network) -> Network:
    """The same network with its large, mostly-zero weights as CSR matrices (`lipsdp.weights.stored`: the
    same numbers), e.g. after a transform that built dense ones."""
    return replace(net, weights=tuple(stored(w) for w in net.weights))


def activation_parts(act: Activation) -> list[Activation]:
    """The activations a composed one (e.g. 'relu+tanh', two activation modules in a row) applies, in order."""
    if "+" not in act.name:
        return [act]
    parts = []
    for label in act.name.split("+"):
        name, _, param = label.partition("(")
        parts.append(activation(name, float(param.rstrip(")"))) if param else activation(name))
    return parts


def apply_activation(act: Activation, h: np.ndarray) -> np.ndarray:
    """Apply an activation (or a composition of several) to a numpy array (neurons on the last axis).

    A `Mixed` layer applies its base activation except on its pass-through neurons, which keep h."""
    if isinstance(act, Mixed):
        h = np.asarray(h)
        if h.shape[-1] != act.size:
            raise InvalidNetworkError(f"a {act.name} layer of {act.size} neurons is applied to {h.shape[-1]} values")
        out = np.array(apply_activation(act.base, h), dtype=np.float64)
        out[..., list(act.identity)] = h[..., list(act.identity)]
        return out
    if isinstance(act, Reflect):
        h = np.asarray(h)
        if h.shape[-1] != act.size:
            raise InvalidNetworkError(f"a {act.name} layer of {act.size} neurons is applied to {h.shape[-1]} values")
        return np.where(act.mask(), np.abs(h), h)
    if "+" in act.name:
        for part in activation_parts(act):
            h = apply_activation(part, h)
        return h
    if act.name == "relu":
        return np.maximum(h, 0.0)
    if act.name == "tanh":
        return np.tanh(h)
    if act.name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * h))
    if act.name == "softplus":
        return np.logaddexp(0.0, h)
    if act.name == "identity":
        return h
    if act.name == "abs":
        return np.abs(h)
    if act.name == "leaky_relu":
        return np.where(h >= 0, h, act.param * h)
    if act.name == "elu":
        return np.where(h > 0, h, act.param * np.expm1(np.minimum(h, 0.0)))
    raise InvalidNetworkError(f"activation {act.name} has no forward implementation")


def pair_network(net: Network, pair: Sequence[int]) -> Network:
    """The network computing f_i - f_j (last layer: row i minus row j)."""
    try:
        i, j = (int(v) for v in pair)
    except (TypeError, ValueError):
        raise InvalidNetworkError(f"pair must be two class indices (i, j), got {pair!r}") from None
    n_out = net.sizes[-1]
    if not (0 <= i < n_out and 0 <= j < n_out) or i == j:
        raise InvalidNetworkError(f"pair {pair!r}: need two different class indices in 0..{n_out - 1}")
    rows, b = dense(net.weights[-1][[i, j]]), net.biases[-1]
    return net.with_last_weight(rows[0] - rows[1], np.atleast_1d(b[i] - b[j]))
