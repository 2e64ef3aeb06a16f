"""Exact power-of-two rescaling of each layer, so the LMI methods see well-scaled weights.

Why: interior-point solvers stop at absolute tolerances, and the certifier needs its numbers far from
under- and overflow, so a net whose weights are 1e-8 or 1e8 gets a loose bound or none at all. The
LipSDP value is exactly homogeneous in each layer's scale:

With c_k = 2^e_k, scaled weights W^_k = c_k W_k and s_k = c_0 ... c_{k-1} (s_0 = 1), the map
z^_k = s_k z_k turns F(rho, T) for W into F^(rho^, T^) for W^ with rho^ = s_{l+1}^2 rho and
T^_k = s_{l+1}^2 T_k / s_k^2; precisely F = D F^ D / s_{l+1}^2 with D = diag(s_k I), a congruence.
So F^(rho^, T^) >= 0 proves F(rho, T) >= 0, i.e. L <= sqrt(rho^) / s_{l+1}, for *any* slope-restricted
activation: the LMI depends only on the weights and the slope bounds [alpha, beta], never on the function
itself. (For relu / leaky_relu / identity the scaled net is moreover the same function times s_{l+1}.)

Powers of two make the scaling exact in float64: the scaled weights are exactly c_k W_k (checked), and
dividing the verified bound by s_{l+1} is exact unless it leaves the normal range, where it is rounded up
or refused. Only the methods listed in `LMI_METHODS`, whose bounds depend on weights and slopes alone,
are rescaled; any other method sees the network unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lipsdp import reduced
from lipsdp.errors import LipSDPError, VerificationError
from lipsdp.network import Network
from lipsdp.weights import (
    all_finite,
    equal,
    largest_magnitude,
    ldexp,
    nonzero_columns,
    nonzero_rows,
    nonzeros,
    scale_rows,
    stored,
)

# Methods whose bound is a function of (weights, slope bounds) only, so the congruence above applies.
LMI_METHODS = frozenset({"naive", "sequential", "anytime", "layer", "neuron", "neuron-dense"})
POSITIVELY_HOMOGENEOUS = frozenset({"relu", "leaky_relu", "identity"})
_SMALLEST_NORMAL = np.finfo(np.float64).tiny
NOTE_EXPONENT = 8  # mention the rescaling in the result's notes only when some layer moved by >= 2^8


@dataclass(frozen=True)
class Rescaled:
    """A network with layer k multiplied by 2**exponents[k] (exactly), and how to undo it."""

    network: Network
    exponents: tuple[int, ...]

    @property
    def total(self) -> int:
        """log2 of s_{l+1} = prod c_k: bounds of the scaled net are 2**total times the original's."""
        return int(sum(self.exponents))

    def upper_bound(self, scaled_upper: float) -> float:
        """Verified bound for the original network from a verified bound of the scaled one (rounded up)."""
        if scaled_upper <= 0.0:
            return float(scaled_upper)
        try:
            out = math.ldexp(scaled_upper, -self.total)
        except OverflowError:
            out = math.inf
        if not math.isfinite(out):
            raise VerificationError(
                f"the verified Lipschitz bound is about 2^{math.log2(scaled_upper) - self.total:.0f}, beyond the "
                "float64 range; scale the network's weights down before bounding it"
            )
        if out < _SMALLEST_NORMAL:  # subnormal: ldexp may have rounded down
            out = math.nextafter(out, math.inf)
        return out

    def lower_bound(self, scaled_lower: float | None) -> float | None:
        """A proven lower bound for the original network from one of the scaled net (rounded down)."""
        if scaled_lower is None or scaled_lower <= 0.0:
            return scaled_lower
        try:
            out = math.ldexp(scaled_lower, -self.total)
        except OverflowError:
            return None
        if out < _SMALLEST_NORMAL:  # subnormal: ldexp may have rounded up
            out = math.nextafter(out, 0.0)
        return out if math.isfinite(out) else None

    def value(self, scaled_value: float) -> float:
        """An unverified value (e.g. the solver's raw sqrt(rho)) mapped back; for information only."""
        try:
            return math.ldexp(scaled_value, -self.total) if math.isfinite(scaled_value) else scaled_value
        except OverflowError:
            return math.inf

    def multipliers(self, scaled_t: np.ndarray | None) -> np.ndarray | None:
        """The original network's multipliers T_k = T^_k s_k^2 / s_{l+1}^2 (may underflow; informational)."""
        if scaled_t is None or self.network.depth == 0:
            return scaled_t
        t = np.asarray(scaled_t, dtype=np.float64).reshape(-1)
        sizes = self.network.hidden_sizes
        prefix = np.cumsum((0,) + self.exponents)  # log2 s_k for k = 0..l+1
        shifts = np.repeat([2 * (int(prefix[k]) - self.total) for k in range(1, len(sizes) + 1)], sizes)
        return np.ldexp(t, shifts) if t.size == shifts.size else t


def layer_exponents(net: Network) -> list[int]:
    """e_k with 2**e_k * max|W_k| in [0.5, 1); 0 for an all-zero layer."""
    out = []
    for w in net.weights:
        m = largest_magnitude(w)  # no |W| copy
        out.append(0 if m == 0.0 else -math.frexp(m)[1])
    return out


def rescale(net: Network, exponents: list[int] | None = None) -> Rescaled:
    """Scale each layer by an exact power of two (default: `layer_exponents`).

    A layer whose scaling would not be exact (entries pushed into the subnormal range and rounded) keeps
    exponent 0. Biases are scaled by s_{k+1}, so for positively homogeneous activations the scaled net is
    exactly 2**total times the original function; biases that would overflow are set to zero (the LMI
    methods never read them).
    """
    exps = list(layer_exponents(net) if exponents is None else exponents)
    weights = []
    for k, w in enumerate(net.weights):
        if not exps[k]:  # unscaled: the same array (a CNN's unrolled layers are GBs)
            weights.append(w)
            continue
        scaled = ldexp(w, exps[k])
        if not (all_finite(scaled) and equal(ldexp(scaled, -exps[k]), w)):
            exps[k], scaled = 0, w
        weights.append(scaled)
    prefix = np.cumsum(exps)
    biases = []
    for k, b in enumerate(net.biases):
        scaled = np.ldexp(b, int(prefix[k]))
        biases.append(scaled if np.all(np.isfinite(scaled)) else np.zeros_like(b))
    # a structured operator (a convolution) scales with its weight, exactly
    ops = ()
    if len(net.operators) == len(net.weights):  # (a transform that changed the layers left a stale tuple)
        ops = tuple(op.scaled(e) if e and hasattr(op, "scaled") else op for op, e in zip(net.operators, exps))
    return Rescaled(
        replace(net, weights=tuple(weights), biases=tuple(biases), operators=ops), tuple(int(e) for e in exps)
    )


def fold_linear_layers(net: Network) -> Network:
    """Multiply out hidden layers whose every neuron has alpha == beta (identity, leaky_relu:1): there
    phi(z) = alpha z + const, so W_{k+1} phi(W_k x + b_k) is one affine map and the function is unchanged.
    Why: for such neurons LipSDP's infimum is reached only as T -> infinity, so solvers and the
    layer-by-layer multipliers stop measurably above it (even above the naive product)."""
    if not any(np.array_equal(a, b) for a, b in zip(net.alphas, net.betas)):
        return net
    weights, biases, acts, alphas, betas = [net.weights[0]], [net.biases[0]], [], [], []
    for k in range(net.depth):
        a, b = net.alphas[k], net.betas[k]
        w_next, b_next = net.weights[k + 1], net.biases[k + 1]
        if np.array_equal(a, b):
            weights[-1] = stored(w_next @ scale_rows(weights[-1], a))
            # Slopes in [a, a] force phi(z) = a z + c; c = 0 for identity / leaky_relu:1 (and LMI methods
            # never read biases, so local slope bounds with alpha == beta fold the same way).
            biases[-1] = w_next @ (a * biases[-1]) + b_next
        else:
            acts.append(net.activations[k])
            alphas.append(a)
            betas.append(b)
            weights.append(w_next)
            biases.append(b_next)
    return replace(
        net,
        weights=tuple(weights),
        biases=tuple(biases),
        activations=tuple(acts),
        alphas=tuple(alphas),
        betas=tuple(betas),
    )


def prune_dead_neurons(net: Network) -> Network | None:
    """Drop hidden neurons with an all-zero input row (constant) or output column (unused); the function
    is unchanged (a constant neuron's output moves into the next bias). Returns None when the network is
    constant (a zero layer, or a layer left with no neuron): then L = 0. Zero rows and columns make the
    LMI's blocks singular, which is what stops the certificate on such nets."""
    return prune_dead_neurons_kept(net)[0]


def prune_dead_neurons_kept(net: Network) -> tuple[Network | None, list[np.ndarray]]:
    """`prune_dead_neurons`, also returning for each hidden layer the indices of the neurons kept."""
    from lipsdp.activations import select_neurons
    from lipsdp.network import apply_activation

    kept = [np.arange(n) for n in net.hidden_sizes]
    if any(nonzeros(w) == 0 for w in net.weights):
        return None, kept
    ws, bs = list(net.weights), list(net.biases)
    acts, alphas, betas = list(net.activations), list(net.alphas), list(net.betas)
    changed = True
    while changed:
        changed = False
        for k in range(len(acts)):
            keep = nonzero_rows(ws[k]) & nonzero_columns(ws[k + 1])
            if keep.all():
                continue
            if not keep.any():
                return None, kept
            const = ~nonzero_rows(ws[k]) & nonzero_columns(ws[k + 1])
            if const.any():
                try:
                    phi_b = apply_activation(select_neurons(acts[k], const), bs[k][const])
                    bs[k + 1] = bs[k + 1] + ws[k + 1][:, const] @ phi_b
                except LipSDPError:  # e.g. composed activations: the LMI methods never read biases
                    pass
            ws[k], bs[k], alphas[k], betas[k] = ws[k][keep], bs[k][keep], alphas[k][keep], betas[k][keep]
            acts[k] = select_neurons(acts[k], keep)
            ws[k + 1] = ws[k + 1][:, keep]
            kept[k] = kept[k][keep]
            changed = True
    if ws[0].shape[0] == net.weights[0].shape[0] and all(a.shape == b.shape for a, b in zip(ws, net.weights)):
        return net, kept
    pruned = replace(net, weights=tuple(ws), biases=tuple(bs), activations=tuple(acts), alphas=tuple(alphas),
                     betas=tuple(betas))
    return pruned, kept


def bound_rescaled(method_fn: Callable[..., Any], net: Network, method: str, options: dict[str, Any]) -> Any:
    """Run `method_fn` (a registered method returning a `MethodOutput`) on the layer-normalised network
    and map its verified bound back. Methods outside `LMI_METHODS`, and nets already well scaled, run
    unchanged. The output's `proof` (`lipsdp.proof`) is extended by the exact steps taken here ('keep',
    'fold', 'scale'), so it proves the bound of `net` itself."""
    from lipsdp.proof import Proof, Step, keep_step

    if str(method).strip().lower() not in LMI_METHODS:
        return method_fn(net, **options)
    notes = []
    steps = []
    pruned, kept = prune_dead_neurons_kept(net)
    if pruned is None:
        from lipsdp.methods import MethodOutput

        return MethodOutput(
            0.0,
            0.0,
            "ok",
            "constant function (a zero layer)",
            None,
            notes=["a layer is zero or all its neurons are dead: the network is constant, L = 0 exactly"],
            proof=Proof("zero"),
        )
    if pruned is not net:
        steps.append(keep_step(kept))
        notes.append(
            f"{net.n_neurons - pruned.n_neurons} dead neuron(s) (zero input row or output column) dropped"
        )
        net = pruned
    folded = fold_linear_layers(net)
    if folded is not net:
        linear = tuple(k for k in range(net.depth) if np.array_equal(net.alphas[k], net.betas[k]))
        steps.append(Step("fold", layers=linear))
        notes.append(
            f"{net.depth - folded.depth} linear hidden layer(s) multiplied into their neighbours (exact)"
        )
        net = folded
    if notes:  # the structure changed: multipliers of the reduced net do not fit the original
        out = bound_rescaled(method_fn, net, method, options)
        proof = out.proof.after(*steps) if out.proof is not None else None
        return replace(out, multipliers=None, notes=list(out.notes) + notes, proof=proof)
    exponents = layer_exponents(net)
    if max(map(abs, exponents), default=0) < NOTE_EXPONENT and reduced.plan(net):
        # wide CNN layers (eliminated from the LMI) already within 2^8 of unit scale: the certificate
        # balances the LMI anyway, and a rescaled copy of their unrolled weights would cost GBs
        return method_fn(net, **options)
    scaled = rescale(net, exponents)
    if not any(scaled.exponents):
        return method_fn(net, **options)
    out = method_fn(scaled.network, **options)
    notes = list(out.notes) + notes
    if max(abs(e) for e in scaled.exponents) >= NOTE_EXPONENT:
        notes.append(
            f"weights rescaled per layer by 2^{list(scaled.exponents)} for conditioning; "
            "the verified bound is scaled back exactly"
        )
    return replace(
        out,
        upper=scaled.upper_bound(out.upper),
        sdp_lower=scaled.lower_bound(out.sdp_lower),
        raw=scaled.value(out.raw),
        multipliers=scaled.multipliers(out.multipliers),
        notes=notes,
        proof=out.proof.after(Step("scale", exponents=scaled.exponents)) if out.proof is not None else None,
    )
