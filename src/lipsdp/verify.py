"""Re-prove a certificate file's bound by an independent route: ball arithmetic (python-flint's arb).

`verify(cert, model)` loads MODEL with the normal loaders, checks its sha256 against the certificate,
rebuilds every transformed network the proof names in ball arithmetic (arb midpoint-radius intervals
with unbounded exponents, so nets with constants near 1e300 or 1e-300 are no special case), and proves
each claim in the proof again. It shares no code with `lipsdp.lmi`, `lipsdp.certificate`,
`lipsdp.scaling` or the methods: the LMI's blocks, the transforms, the slope bounds of the activations
and the positive-definiteness proof are written here afresh. numpy/scipy serve only to compute an
*approximate* factor in float64, which the proof does not need to be accurate.

The mathematics relied on
-------------------------
1. LipSDP (Fazlyab et al. 2019). Hidden neuron i of a layer has secant slopes in [a_i, b_i]: for
   z = W x_prev and x = phi(z), (dx_i - a_i dz_i)(b_i dz_i - dx_i) >= 0 for any two inputs. Weighting these
   by t_i / 2 >= 0 and adding them to rho |dx_0|^2 - |W_l dx_l|^2 gives the quadratic form of the
   block-tridiagonal F (blocks x_0, x_1, ..., x_l)

       F_00 = rho I + W_0' diag(2 a b t)_1 W_0      F_kk = 2 diag(t_k) + W_k' diag(2 a b t)_{k+1} W_k
       F_ll = 2 diag(t_l) - W_l' W_l                 F_(k-1,k) = -W_(k-1)' diag((a + b) t)_k

   (one hidden layer less: drop the middle blocks; no hidden layer: F = rho I - W_0'W_0). If F >= 0 and
   t >= 0 then |f(x) - f(y)|^2 <= rho |x - y|^2, i.e. L <= sqrt(rho). One hidden layer much wider than
   input and output, with every t > 0: F > 0 iff [[F_00, F_01, 0], [F_01', 2 diag(t), W_1'], [0, W_1, I]]
   > 0 (Schur complement on I) iff its Schur complement on the diagonal 2 diag(t) > 0 is, which is
   [[rho I - W_0' diag((b - a)^2 t / 2) W_0, W_0' diag((a + b) / 2) W_1'], [., I - W_1 diag(1 / (2t)) W_1']]
   of order n_0 + n_2; that matrix is proved instead.
2. Positive definiteness (a residual form of Rump's argument, BIT 46, 2006). With an exact power-of-two
   diagonal S (Jacobi scaling), F^ = S F S. For *any* real matrix G (here a float64 block Cholesky factor
   of F^ - cI) put E = F^ - cI - G G', formed in ball arithmetic. Since G G' >= 0,
   x'F^x = c|x|^2 + |G'x|^2 + x'Ex >= (c - ||E||_2)|x|^2, so c > ||E||_2 proves F^ > 0, and F > 0 by
   Sylvester's law of inertia (S is nonsingular). ||E||_2 <= max_k sum_j ||E_kj||_F (the norm of a
   symmetric block matrix is at most that of its matrix of block norms, itself at most its largest row
   sum; the spectral norm is at most the Frobenius norm).
3. Slopes: the secant slope of phi between two points is a mean of phi' over the segment, so it lies in
   [min phi', max phi'] over any interval containing both; relu, leaky_relu, elu, tanh, sigmoid,
   softplus and identity are monotone and their derivatives' extremes are at the ends of an interval (or
   at 0 for tanh and sigmoid); |x| has secant slopes in [-1, 1] (||x| - |y|| <= |x - y|), exactly 1 or -1
   on an interval of one sign, and its image of [l, u] is [0, max(-l, u)] when l < 0 < u. Local slopes
   come from interval propagation over the region, in arb. A layer 'base|identity' (a lowered graph)
   applies base except on its pass-through neurons, which are the identity (slope exactly 1); a layer
   'reflect' applies |.| on its neurons `flip` and the identity on the others (its pass-through neurons
   `identity` among them).
4. Every proof kind bounds *every* network with the given weights and per-neuron slope ranges; the
   checker never uses an activation function itself after the slope ranges are found. Hence layer
   scaling: with s_k = 2^(e_0 + ... + e_(k-1)) and x~_k = s_k x_k, s_(l+1) f is the network with weights
   2^e_k W_k and activations psi_k(u) = s_(k+1) phi_k(u / s_(k+1)), whose secant slopes are those of
   phi_k; so L(f) <= bound(scaled) / 2^(sum e). Scaling by 2^e is exact in arb. The other transforms
   are replayed exactly or as balls: dropping neurons whose incoming row or outgoing column is exactly
   zero, or that are constant on the region (slope range {0}); multiplying out layers whose slope range
   is one point a (phi(z) = a z + c there); the class-pair row difference; the split of the chain (L of
   a composition is at most the product of the pieces' constants and the boundary activations'
   Lipschitz constants max(|a|, |b|)).
5. Max pooling (a 'compose' proof): the model as loaded carries its graph's factoring at max pools
   (`lipsdp.compose`, whose module docstring proves Lip(P) <= sqrt(m) for a pool of multiplicity m). The
   checker trusts that factoring and the parts' exact lowering (this project's code, re-run on the model
   file, as it trusts the loaders); it re-proves each part's bound as above (a class pair applies to the
   last part) and c^2 >= m for each pool's constant c, and multiplies. With weighted pools it checks each
   weight inequality sigma_j >= sum tau_i in exact integer arithmetic (`compose.weights_hold`), trusts
   the exact power-of-two scaling of the parts (`compose.weighted_parts`, checked exact there) like the
   lowering, re-proves the weighted parts' bounds and c^2 >= 1.

What is guaranteed: `accepted` is True only if the checker proved that the Lipschitz constant of the
target (f, or f_i - f_j; on the certificate's region if it names one) is at most `proven` and that the
certificate's claimed `upper` is at least `proven`. A rejection says which check failed; it may also
mean that a valid bound's margin is below this checker's resolution (about 1e-15 relative).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from lipsdp.errors import CertificateError, LipSDPError
from lipsdp.io import load_network
from lipsdp.network import dense_weights
from lipsdp.proof import CertificateFile, Proof, Step, network_sha256, parse_certificate

DEFAULT_PREC = 128  # bits of the ball arithmetic
_U = 2.0**-53


class _Reject(Exception):
    """A check failed; the message is the reason reported."""


@dataclass(frozen=True)
class Verification:
    """The checker's verdict on a certificate.

    accepted   True iff the bound was re-proved and the claimed upper is at least the re-proved bound
    reason     why it was rejected, or a one-line summary of what was proved
    claimed    the certificate's claimed upper bound
    proven     the upper bound the checker proved (rounded up to a float), None if it proved none
    statement  what the bound is about (the function and where)
    seconds    time taken
    """

    accepted: bool
    reason: str
    claimed: float
    proven: float | None
    statement: str
    seconds: float


# -- ball-arithmetic helpers --------------------------------------------------------------------------
def _flint():
    try:
        import flint
    except ImportError:  # pragma: no cover - a declared dependency
        raise CertificateError("checking a certificate needs python-flint: pip install 'python-flint>=0.6,<1'") from None
    return flint


_POW2: dict[int, Any] = {}


def _pow2(e: int):
    """2^e as an exact arb."""
    out = _POW2.get(e)
    if out is None:
        out = _flint().arb(2) ** int(e)
        if not out.is_exact():  # pragma: no cover - arb computes powers of two exactly
            raise _Reject(f"2^{e} is not exact in the ball arithmetic")
        _POW2[e] = out
    return out


def _mat(a: np.ndarray):
    """An exact arb_mat from a float64 array (2-D)."""
    a = np.asarray(a, dtype=np.float64)
    return _flint().arb_mat(a.tolist())


def _col(values: list) -> Any:
    return _flint().arb_mat([[v] for v in values])


def _scale_rows(m, v: list):
    """diag(v) m for a list of arbs v."""
    rows = m.tolist()
    return _flint().arb_mat([[x * v[i] for x in row] for i, row in enumerate(rows)])


def _diag(values: list):
    n = len(values)
    out = _flint().arb_mat(n, n)
    for i, v in enumerate(values):
        out[i, i] = v
    return out


def _select(m, rows: list[int] | None, cols: list[int] | None):
    entries = m.tolist()
    rows = range(m.nrows()) if rows is None else rows
    cols = range(m.ncols()) if cols is None else cols
    return _flint().arb_mat([[entries[i][j] for j in cols] for i in rows])


def _zero_mask(m) -> np.ndarray:
    return np.array([[x.is_zero() for x in row] for row in m.tolist()], dtype=bool).reshape(m.nrows(), m.ncols())


def _exact(x) -> Any:
    return _flint().arb(x)


def _up(x) -> float:
    """A float >= every point of the ball x (inf if none fits)."""
    u = x.upper()
    f = float(u)
    if not math.isfinite(f):
        return math.inf if f > 0 or math.isnan(f) else f
    fa = _flint().arb(f)
    while fa < u:  # float() rounds to nearest: step up until above
        f = math.nextafter(f, math.inf)
        fa = _flint().arb(f)
    return f


# -- activations: true slope ranges -------------------------------------------------------------------
_LABEL = re.compile(r"^([a-z_]+)(?:\(([^)]*)\))?$")


def _parts(act: Any) -> list[tuple[str, float | None]]:
    """(name, parameter) of each activation applied in a row (a composed one is 'relu+tanh', ...)."""
    if "+" not in act.name:
        return [(act.name, None if act.param is None else float(act.param))]
    out = []
    for label in act.name.split("+"):
        m = _LABEL.match(label.strip())
        if m is None:
            raise _Reject(f"cannot parse the composed activation '{act.name}'")
        out.append((m.group(1), float(m.group(2)) if m.group(2) else None))
    return out


def _global_range(name: str, param: float | None) -> tuple[Any, Any]:
    """[inf, sup] of the secant slopes of one activation over the whole real line (exact arbs)."""
    arb = _flint().arb
    if name in ("relu", "tanh", "softplus"):
        return arb(0), arb(1)
    if name == "sigmoid":
        return arb(0), arb(0.25)
    if name == "identity":
        return arb(1), arb(1)
    if name == "abs":  # |x| - |y| lies between -(x - y) and x - y
        return arb(-1), arb(1)
    if name == "leaky_relu":
        p = arb(0.01 if param is None else param)
        return (p, arb(1)) if p < 1 else (arb(1), p)
    if name == "elu":  # elu' = p e^x in (0, p) for x < 0, 1 for x > 0
        p = arb(1.0 if param is None else param)
        if p < 0:
            raise _Reject("elu with a negative parameter is not monotone; no slope bounds are known")
        return arb(0), (p if p > 1 else arb(1))
    raise _Reject(f"activation '{name}' has no slope bounds known to the checker")


def _interval_product(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    """[lo, hi] (exact arbs) containing x * y for every x in a, y in b."""
    products = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    lo, hi = products[0].lower(), products[0].upper()
    for p in products[1:]:
        lo, hi = _min(lo, p.lower()), _max(hi, p.upper())
    return lo, hi


def _activation_range(act: Any) -> tuple[Any, Any]:
    """Secant slope range of a (possibly composed) activation: a product of its parts' ranges (the
    secant slope of g(h(.)) is the product of those of g and h)."""
    rng = None
    for name, param in _parts(act):
        r = _global_range(name, param)
        rng = r if rng is None else _interval_product(rng, r)
    return rng


def _phi(name: str, param: float | None, x):
    """The activation at an exact arb x (a ball)."""
    arb = _flint().arb
    if name == "relu":
        return x if x > 0 else arb(0)
    if name == "leaky_relu":
        p = 0.01 if param is None else param
        return x if x >= 0 else arb(p) * x
    if name == "identity":
        return x
    if name == "abs":
        return abs(x)
    if name == "tanh":
        return x.tanh()
    if name == "sigmoid":
        return 1 / (1 + (-x).exp())
    if name == "softplus":
        return x.exp().log1p() if x < 0 else x + (-x).exp().log1p()
    if name == "elu":
        p = 1.0 if param is None else param
        return x if x > 0 else arb(p) * x.expm1()
    raise _Reject(f"activation '{name}' cannot be evaluated by the checker")


def _local_range(name: str, param: float | None, lo, hi) -> tuple[Any, Any]:
    """[min phi', max phi'] over [lo, hi] (exact arbs), enclosed outward."""
    arb = _flint().arb
    if name == "identity":
        return arb(1), arb(1)
    if name == "abs":
        return (arb(1), arb(1)) if lo >= 0 else (arb(-1), arb(-1)) if hi <= 0 else (arb(-1), arb(1))
    if name in ("relu", "leaky_relu"):
        p = arb(0) if name == "relu" else arb(0.01 if param is None else param)
        if hi <= 0:
            return p, p
        if lo >= 0:
            return arb(1), arb(1)
        return (p, arb(1)) if p < 1 else (arb(1), p)
    if name in ("tanh", "sigmoid"):
        half, quarter = (arb(1), arb(1)) if name == "tanh" else (arb(0.5), arb(0.25))

        def d(x):
            return quarter * (half * x).sech() ** 2

        dl, dh = d(lo), d(hi)
        low = min(dl.lower(), dh.lower())
        top = quarter if (lo <= 0 and hi >= 0) else (max(dl.upper(), dh.upper()))
        return low, top
    if name == "softplus":  # softplus' = sigmoid, increasing
        return _phi("sigmoid", None, lo).lower(), _phi("sigmoid", None, hi).upper()
    if name == "elu":
        p = arb(1.0 if param is None else param)
        if lo >= 0:
            return arb(1), arb(1)
        if hi <= 0:
            return (p * lo.exp()).lower(), (p * hi.exp()).upper()
        low = (p * lo.exp()).lower()
        return (low if low < 1 else arb(1)), (p if p > 1 else arb(1))
    raise _Reject(f"activation '{name}' has no local slope bounds in the checker")


# -- the network as the checker sees it ---------------------------------------------------------------
@dataclass
class _State:
    """Weights (arb_mat, W_k of shape n_{k+1} x n_k) and, per hidden neuron, exact ends [lo, hi] of an
    interval containing its true secant slopes."""

    weights: list
    lows: list[list]
    highs: list[list]

    @property
    def depth(self) -> int:
        return len(self.weights) - 1

    @property
    def hidden(self) -> list[int]:
        return [w.nrows() for w in self.weights[:-1]]


def _layer_parts(act: Any, n: int) -> tuple[Any, set[int], set[int]]:
    """The activation of a hidden layer's neurons, the set of its pass-through (identity) neurons and the
    set of its |.| neurons: a layer named 'base|identity' applies `act.base` except on the neurons
    `act.identity`; a layer named 'reflect' applies |.| on `act.flip` and the identity elsewhere."""
    if act.name == "reflect":
        flip = {int(i) for i in getattr(act, "flip", ())}
        passing = {int(i) for i in getattr(act, "identity", ())}
        if getattr(act, "size", None) != n or any(not 0 <= i < n for i in flip | passing) or flip & passing:
            raise _Reject(f"the layer '{act.name}' does not describe its {n} neurons")
        return _IDENTITY, passing, flip
    identity = getattr(act, "identity", None)
    if identity is None:
        return act, set(), set()
    passing = {int(i) for i in identity}
    if getattr(act, "size", None) != n or any(not 0 <= i < n for i in passing) or getattr(act, "base", None) is None:
        raise _Reject(f"the layer '{act.name}' does not describe its {n} neurons")
    return act.base, passing, set()


@dataclass(frozen=True)
class _Named:
    name: str
    param: float | None = None


_IDENTITY = _Named("identity")


def _abs_image(lo, hi) -> tuple[Any, Any]:
    """Exact ends enclosing |x| over [lo, hi] (|.| is not monotone: 0 when the interval holds 0)."""
    arb = _flint().arb
    if lo >= 0:
        return lo, hi
    if hi <= 0:
        return -hi, -lo
    return arb(0), _max(-lo, hi)


def _initial_state(net: Any) -> _State:
    arb = _flint().arb
    lows, highs = [], []
    for k, act in enumerate(net.activations):
        n = net.weights[k].shape[0]
        base, passing, flipping = _layer_parts(act, n)
        lo, hi = _activation_range(base)
        lows.append([arb(1) if i in passing else arb(-1) if i in flipping else lo for i in range(n)])
        highs.append([arb(1) if i in passing or i in flipping else hi for i in range(n)])
    return _State([_mat(w) for w in net.weights], lows, highs)


def _region_ranges(net: Any, region: dict[str, Any]) -> list[tuple[list, list]]:
    """Interval propagation in arb: for each hidden layer, exact ends [L_i, H_i] enclosing the
    pre-activations over the region (box: centre +- |W| radius; ball: centre +- eps ||row||_2)."""
    arb = _flint().arb
    n0 = net.weights[0].shape[1]
    w0 = _mat(net.weights[0])
    if region["kind"] == "box":
        low, high = np.asarray(region["low"], float), np.asarray(region["high"], float)
        if low.shape != (n0,) or high.shape != (n0,) or not np.all(low <= high) or not np.all(np.isfinite(low) & np.isfinite(high)):
            raise _Reject(f"the certificate's box must have {n0} finite entries with low <= high")
        mid = [(arb(a) + arb(b)) / 2 for a, b in zip(low, high)]
        rad = [(arb(b) - arb(a)) / 2 for a, b in zip(low, high)]
        centre = w0 * _col(mid)
        spread = _mat(np.abs(net.weights[0])) * _col(rad)
        spread = [spread[i, 0] for i in range(spread.nrows())]
    else:
        center, eps = np.asarray(region["center"], float), float(region["eps"])
        if center.shape != (n0,) or not np.all(np.isfinite(center)) or not (math.isfinite(eps) and eps >= 0):
            raise _Reject(f"the certificate's ball must have a finite centre of {n0} entries and eps >= 0")
        centre = w0 * _col([arb(c) for c in center])
        gram = w0 * w0.transpose()
        spread = [arb(eps) * gram[i, i].sqrt() for i in range(gram.nrows())]
    out = []
    pre = [(centre[i, 0] + arb(net.biases[0][i]), spread[i]) for i in range(centre.nrows())]
    for k in range(len(net.activations)):
        lo = [(c - s).lower() for c, s in pre]
        hi = [(c + s).upper() for c, s in pre]
        out.append((lo, hi))
        if k + 1 == len(net.activations):
            break
        base, passing, flipping = _layer_parts(net.activations[k], len(lo))
        parts = _parts(base)
        if len(parts) != 1:
            raise _Reject("local bounds need plain activations (this layer composes two)")
        name, param = parts[0]
        if name == "abs":
            flipping = set(range(len(lo)))
        # the other activations are monotone non-decreasing: the image of [l, u] is [phi(l), phi(u)]
        img_lo = [x if i in passing else _abs_image(x, hi[i])[0] if i in flipping else _phi(name, param, x).lower()
                  for i, x in enumerate(lo)]
        img_hi = [x if i in passing else _abs_image(lo[i], x)[1] if i in flipping else _phi(name, param, x).upper()
                  for i, x in enumerate(hi)]
        mid = _col([(a + b) / 2 for a, b in zip(img_lo, img_hi)])
        rad = _col([(b - a) / 2 for a, b in zip(img_lo, img_hi)])
        w = net.weights[k + 1]
        c = _mat(w) * mid
        s = _mat(np.abs(w)) * rad
        pre = [(c[i, 0] + arb(net.biases[k + 1][i]), s[i, 0]) for i in range(c.nrows())]
    return out


def _max(a, b):
    return max(a, b)


def _min(a, b):
    return min(a, b)


def _localize(state: _State, net: Any, step: Step) -> _State:
    ranges = _region_ranges(net, step.region)
    for k, (lo, hi) in enumerate(ranges):
        base, passing, flipping = _layer_parts(net.activations[k], len(lo))
        parts = _parts(base)
        if len(parts) != 1:
            raise _Reject("local bounds need plain activations (a layer composes two)")
        name, param = parts[0]
        for i in range(len(lo)):
            which = "identity" if i in passing else "abs" if i in flipping else name
            a, b = _local_range(which, param, lo[i], hi[i])
            state.lows[k][i] = _max(a, state.lows[k][i])
            state.highs[k][i] = _min(b, state.highs[k][i])
    keep = _check_keep(step.keep, state.hidden, "localize")
    zeroed = set(step.zeroed)
    for k, kept in enumerate(keep):
        for i in set(range(state.hidden[k])) - set(kept):
            if not _constant(state, k, i):
                raise _Reject(f"localize drops neuron {i} of hidden layer {k + 1}, which is not constant on the region")
    weights = list(state.weights)
    for k, kept in enumerate(keep):
        weights[k] = _select(weights[k], kept, None)
        weights[k + 1] = _select(weights[k + 1], None, kept)
        state.lows[k] = [state.lows[k][i] for i in kept]
        state.highs[k] = [state.highs[k][i] for i in kept]
    for k in zeroed:
        if not (0 <= k < len(keep)) or len(keep[k]) != 1 or not _constant(state, k, 0):
            raise _Reject(f"localize zeroes the outgoing weights of hidden layer {k + 1}, which is not constant")
        w = weights[k + 1]
        for r in range(w.nrows()):
            w[r, 0] = _flint().arb(0)
    return _State(weights, state.lows, state.highs)


def _constant(state: _State, k: int, i: int) -> bool:
    """Neuron i of hidden layer k has every secant slope 0 on the inputs considered: its output is constant."""
    return state.lows[k][i].is_zero() and state.highs[k][i].is_zero()


def _check_keep(keep: tuple, hidden: list[int], what: str) -> list[list[int]]:
    if len(keep) != len(hidden):
        raise _Reject(f"{what}: {len(keep)} kept-neuron lists for {len(hidden)} hidden layers")
    out = []
    for k, (kept, n) in enumerate(zip(keep, hidden)):
        kept = list(kept)
        if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n:
            raise _Reject(f"{what}: the kept neurons of hidden layer {k + 1} must be increasing indices below {n}")
        out.append(kept)
    return out


def _prune(state: _State, step: Step) -> _State:
    """Drop neurons whose incoming row or outgoing column is exactly zero among the neurons still there
    (repeatedly, as removing neurons can make others dead)."""
    keep = _check_keep(step.keep, state.hidden, "keep")
    masks = [_zero_mask(w) for w in state.weights]
    alive = [np.ones(n, dtype=bool) for n in state.hidden]
    pending = [set(range(n)) - set(kept) for n, kept in zip(state.hidden, keep)]
    progress = True
    while progress and any(pending):
        progress = False
        for k in range(state.depth):
            for i in sorted(pending[k]):
                rows_in = alive[k - 1] if k > 0 else np.ones(masks[k].shape[1], dtype=bool)
                rows_out = alive[k + 1] if k + 1 < state.depth else np.ones(masks[k + 1].shape[0], dtype=bool)
                if np.all(masks[k][i, rows_in]) or np.all(masks[k + 1][rows_out, i]):
                    alive[k][i] = False
                    pending[k].discard(i)
                    progress = True
    for k, rest in enumerate(pending):
        if rest:
            raise _Reject(f"keep drops neuron {min(rest)} of hidden layer {k + 1}, whose weights are not zero")
    weights = list(state.weights)
    for k, kept in enumerate(keep):
        weights[k] = _select(weights[k], kept, None)
        weights[k + 1] = _select(weights[k + 1], None, kept)
    lows = [[lo[i] for i in kept] for lo, kept in zip(state.lows, keep)]
    highs = [[hi[i] for i in kept] for hi, kept in zip(state.highs, keep)]
    return _State(weights, lows, highs)


def _fold(state: _State, step: Step) -> _State:
    """Multiply out hidden layers whose every neuron has a one-point slope range a: W_{k+1} diag(a) W_k."""
    layers = list(step.layers)
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= state.depth:
        raise _Reject(f"fold: layers must be increasing hidden-layer indices below {state.depth}")
    weights, lows, highs = [state.weights[0]], [], []
    for k in range(state.depth):
        if k in layers:
            a = state.lows[k]
            if not all(lo == hi and lo.is_exact() for lo, hi in zip(state.lows[k], state.highs[k])):
                raise _Reject(f"fold: hidden layer {k + 1} is not exactly linear (its slope range is not one point)")
            weights[-1] = state.weights[k + 1] * _scale_rows(weights[-1], a)
        else:
            lows.append(state.lows[k])
            highs.append(state.highs[k])
            weights.append(state.weights[k + 1])
    return _State(weights, lows, highs)


def _pair(state: _State, step: Step) -> _State:
    i, j = step.pair
    n = state.weights[-1].nrows()
    if not (0 <= i < n and 0 <= j < n) or i == j:
        raise _Reject(f"pair ({i}, {j}) is not two different outputs of a network with {n}")
    rows = state.weights[-1].tolist()
    diff = _flint().arb_mat([[a - b for a, b in zip(rows[i], rows[j])]])
    return _State(state.weights[:-1] + [diff], state.lows, state.highs)


def _scale(state: _State, step: Step) -> tuple[_State, int]:
    if len(step.exponents) != len(state.weights):
        raise _Reject(f"scale: {len(step.exponents)} exponents for {len(state.weights)} layers")
    weights = [w * _pow2(e) for w, e in zip(state.weights, step.exponents)]
    return _State(weights, state.lows, state.highs), int(sum(step.exponents))


# -- positive definiteness ----------------------------------------------------------------------------
def _jacobi(diag: list, upper: list) -> tuple[list, list, list[np.ndarray], list[np.ndarray]]:
    """S F S with S = diag(2^e_i) giving diagonal entries in [1/4, 4): arb blocks and their float64
    midpoints. Rejects a diagonal entry that is not positive (then F is not positive definite)."""
    exps = []
    for k, d in enumerate(diag):
        e = []
        for i in range(d.nrows()):
            x = d[i, i]
            if not x > 0:
                raise _Reject(f"F(rho, T) is not positive definite: diagonal entry {i} of block {k} is not positive")
            man, ex = x.mid().man_exp()
            e.append(-((int(man).bit_length() + int(ex)) // 2))
        exps.append(e)

    def scaled(m, er: list[int], ec: list[int]):
        pr, pc = [_pow2(e) for e in er], [_pow2(e) for e in ec]
        arbs = [[x * p * q for x, q in zip(row, pc)] for row, p in zip(m.tolist(), pr)]
        floats = np.array([[float(x) for x in row] for row in arbs], dtype=np.float64).reshape(m.nrows(), m.ncols())
        if not np.all(np.isfinite(floats)):
            raise _Reject("F(rho, T) is not positive definite: an entry exceeds its diagonal by far (overflow)")
        return _flint().arb_mat(arbs), floats

    d_arb, d_flt, u_arb, u_flt = [], [], [], []
    for k, d in enumerate(diag):
        a, f = scaled(d, exps[k], exps[k])
        d_arb.append(a)
        d_flt.append(0.5 * (f + f.T))
    for k, u in enumerate(upper):
        a, f = scaled(u, exps[k], exps[k + 1])
        u_arb.append(a)
        u_flt.append(f)
    return d_arb, u_arb, d_flt, u_flt


def _float_factor(d: list[np.ndarray], u: list[np.ndarray], shift: float):
    """Approximate block Cholesky of the block-tridiagonal F^ - shift I in float64: diagonal factors L_k
    and subdiagonal blocks M_k (F^ - shift I ~ G G' with G block lower bidiagonal). None if it breaks."""
    import scipy.linalg as sla

    ls, ms = [], [None]
    for k, dk in enumerate(d):
        a = dk - shift * np.eye(dk.shape[0])
        if k:
            m = sla.solve_triangular(ls[-1], u[k - 1], lower=True, check_finite=False).T
            ms.append(m)
            a = a - m @ m.T
        try:
            lk = np.linalg.cholesky(0.5 * (a + a.T))
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(lk)):
            return None
        ls.append(lk)
    return ls, ms


def _residual_estimate(d: list[np.ndarray], u: list[np.ndarray], ls: list, ms: list, shift: float) -> float:
    """A float64 estimate of max_k sum_j ||E_kj||_F (not a bound: it only picks the shift)."""
    rows = []
    for k, dk in enumerate(d):
        r = dk - shift * np.eye(dk.shape[0]) - ls[k] @ ls[k].T
        size = np.linalg.norm(dk) + np.linalg.norm(ls[k]) ** 2
        if k:
            r = r - ms[k] @ ms[k].T
            size += np.linalg.norm(ms[k]) ** 2
        rows.append(np.linalg.norm(r) + 8 * _U * size)
    offs = []
    for k, uk in enumerate(u):
        r = uk.T - ms[k + 1] @ ls[k].T
        offs.append(np.linalg.norm(r) + 8 * _U * (np.linalg.norm(uk) + np.linalg.norm(ms[k + 1]) * np.linalg.norm(ls[k])))
    return max(
        rows[k] + (offs[k - 1] if k else 0.0) + (offs[k] if k < len(offs) else 0.0) for k in range(len(rows))
    )


def _frobenius_upper(m) -> Any:
    """An exact arb >= ||m||_F for every matrix in the ball matrix m."""
    total = sum((x * x for row in m.tolist() for x in row), _flint().arb(0))
    return total.upper().sqrt().upper()


def _residual_bound(d_arb: list, u_arb: list, ls: list, ms: list, shift: float) -> Any:
    """Rigorous max_k sum_j ||E_kj||_F for E = F^ - shift I - G G' (ball arithmetic)."""
    arb = _flint().arb
    diag_norms, off_norms = [], []
    l_arb = [_mat(lk) for lk in ls]
    for k, dk in enumerate(d_arb):
        e = dk - _diag([arb(shift)] * dk.nrows()) - l_arb[k] * l_arb[k].transpose()
        if k:
            m = _mat(ms[k])
            e = e - m * m.transpose()
            off = u_arb[k - 1].transpose() - m * l_arb[k - 1].transpose()
            off_norms.append(_frobenius_upper(off))
        diag_norms.append(_frobenius_upper(e))
    worst = arb(0)
    for k in range(len(diag_norms)):
        row = diag_norms[k] + (off_norms[k - 1] if k else 0) + (off_norms[k] if k < len(off_norms) else 0)
        worst = _max(worst, row.upper())
    return worst


def _prove_positive_definite(diag: list, upper: list, what: str) -> None:
    """Prove the symmetric block-tridiagonal matrix (diagonal blocks `diag`, blocks (k, k+1) `upper`, as
    ball matrices) positive definite, or raise _Reject. See the module docstring, point 2."""
    d_arb, u_arb, d_flt, u_flt = _jacobi(diag, upper)
    factor = _float_factor(d_flt, u_flt, 0.0)
    if factor is None:
        raise _Reject(f"{what} is not positive definite (a float64 Cholesky factorisation breaks down)")
    shift = max(2.0 * _residual_estimate(d_flt, u_flt, *factor, 0.0), _U)
    eta = None
    for _ in range(3):
        factor = _float_factor(d_flt, u_flt, shift)
        if factor is None:
            break
        eta = _residual_bound(d_arb, u_arb, *factor, shift)
        if eta < _flint().arb(shift):
            return
        shift = 2.0 * _up(eta)
    detail = f" (residual bound {float(eta):.3g} >= shift {shift / 2:.3g})" if eta is not None else ""
    raise _Reject(f"{what} could not be proved positive definite{detail}: its smallest eigenvalue is not "
                  "above the float64 resolution of the check")


# -- the proof kinds ----------------------------------------------------------------------------------
def _check_slopes(state: _State, alphas: tuple, betas: tuple, what: str) -> tuple[list, list]:
    if len(alphas) != state.depth or len(betas) != state.depth:
        raise _Reject(f"{what}: slope bounds for {len(alphas)} hidden layers, the network has {state.depth}")
    arb = _flint().arb
    a_out, b_out = [], []
    for k in range(state.depth):
        a, b = np.asarray(alphas[k], float), np.asarray(betas[k], float)
        n = state.hidden[k]
        if a.shape != (n,) or b.shape != (n,) or not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
            raise _Reject(f"{what}: hidden layer {k + 1} needs {n} finite slope bounds alpha and beta")
        la, lb = [arb(x) for x in a], [arb(x) for x in b]
        for i in range(n):
            if not (la[i] <= state.lows[k][i] and lb[i] >= state.highs[k][i]):
                raise _Reject(
                    f"{what}: slope bounds [{a[i]!r}, {b[i]!r}] of neuron {i} of hidden layer {k + 1} do not "
                    f"contain its true slope range [{float(state.lows[k][i]):.17g}, {float(state.highs[k][i]):.17g}]"
                )
        a_out.append(la)
        b_out.append(lb)
    return a_out, b_out


def _layer_lipschitz(state: _State, k: int):
    """An exact arb >= |slope| of every neuron of hidden layer k."""
    worst = _flint().arb(0)
    for lo, hi in zip(state.lows[k], state.highs[k]):
        worst = _max(worst, _max(abs(lo), abs(hi)).upper())
    return worst


def _check_lmi(state: _State, proof: Proof):
    arb = _flint().arb
    rho = proof.rho
    if not (math.isfinite(rho) and rho > 0):
        raise _Reject(f"rho = {rho!r} must be a positive number")
    alphas, betas = _check_slopes(state, proof.alphas, proof.betas, "lmi")
    t = np.asarray(proof.multipliers if proof.multipliers is not None else [], float)
    if t.size != sum(state.hidden):
        raise _Reject(f"lmi: {t.size} multipliers for {sum(state.hidden)} hidden neurons")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        i = int(np.flatnonzero(~(np.isfinite(t) & (t >= 0)))[0])
        raise _Reject(f"lmi: multiplier {i} is {t[i]!r}; LipSDP needs every multiplier finite and >= 0")
    if _eliminates(state, t):
        return _check_eliminated(state, proof, alphas, betas, t)
    ts, start = [], 0
    for n in state.hidden:
        ts.append([arb(x) for x in t[start : start + n]])
        start += n
    w = state.weights
    l = state.depth
    r = arb(rho)
    diag, upper = [], []
    for k in range(l + 1):
        if k < l:
            s = [2 * alphas[k][i] * betas[k][i] * ts[k][i] for i in range(state.hidden[k])]
            block = _scale_rows(w[k], s).transpose() * w[k]
            c = [-(alphas[k][i] + betas[k][i]) * ts[k][i] for i in range(state.hidden[k])]
            upper.append(_scale_rows(w[k], c).transpose())
        else:
            block = -(w[k].transpose() * w[k])
        n = w[k].ncols()
        block = block + (_diag([r] * n) if k == 0 else _diag([2 * x for x in ts[k - 1]]))
        diag.append(block)
    _prove_positive_definite(diag, upper, f"F(rho, T) with rho = {rho!r}")
    return r.sqrt()


def _eliminates(state: _State, t: np.ndarray) -> bool:
    """Point 1's elimination of a single hidden layer: only where it is much smaller, and every t > 0."""
    if state.depth != 1 or not np.all(t > 0):
        return False
    return _much_wider(state.weights[0].ncols(), state.hidden[0], state.weights[1].nrows())


def _much_wider(n0: int, n1: int, n2: int) -> bool:
    """The one hidden layer is eliminated (point 1) when at least 4 times its input and output together."""
    return n1 >= 4 * (n0 + n2)


def _check_eliminated(state: _State, proof: Proof, alphas: list, betas: list, t: np.ndarray):
    arb = _flint().arb
    w0, w1 = state.weights
    ts = [arb(x) for x in t]
    half = arb(1) / 2
    c = [half * (b - a) * (b - a) * x for a, b, x in zip(alphas[0], betas[0], ts)]
    h = [half * (a + b) for a, b in zip(alphas[0], betas[0])]
    inv = [half / x for x in ts]
    r = arb(proof.rho)
    s00 = _diag([r] * w0.ncols()) - _scale_rows(w0, c).transpose() * w0
    s01 = _scale_rows(w0, h).transpose() * w1.transpose()
    w1t = w1.transpose()
    s11 = _diag([arb(1)] * w1.nrows()) - _scale_rows(w1t, inv).transpose() * w1t
    _prove_positive_definite([s00, s11], [s01], f"F(rho, T) with rho = {proof.rho!r} (hidden layer eliminated)")
    return r.sqrt()


def _check_product(state: _State, proof: Proof):
    arb = _flint().arb
    if len(proof.rhos) != len(state.weights) or len(proof.lipschitz) != state.depth:
        raise _Reject(
            f"product: {len(proof.rhos)} norms and {len(proof.lipschitz)} activation constants for a network of "
            f"{len(state.weights)} layers"
        )
    bound = arb(1)
    for k, lip in enumerate(proof.lipschitz):
        if not (math.isfinite(lip) and arb(lip) >= _layer_lipschitz(state, k)):
            raise _Reject(
                f"product: {lip!r} is below the Lipschitz constant {float(_layer_lipschitz(state, k)):.17g} of "
                f"the activations of hidden layer {k + 1}"
            )
        bound = bound * arb(lip)
    for k, (rho, wk) in enumerate(zip(proof.rhos, state.weights)):
        if not (math.isfinite(rho) and rho > 0):
            raise _Reject(f"product: rho_{k} = {rho!r} must be a positive number")
        gram = wk * wk.transpose() if wk.nrows() <= wk.ncols() else wk.transpose() * wk
        block = _diag([arb(rho)] * gram.nrows()) - gram
        _prove_positive_definite([block], [], f"rho_{k} I - W_{k}'W_{k} with rho_{k} = {rho!r}")
        bound = bound * arb(rho).sqrt()
    return bound


def _check_zero(state: _State):
    """The network is constant: some layer is zero, or dropping neurons with a zero incoming row, a zero
    outgoing column or a constant output (slope range {0}) repeatedly empties a hidden layer."""
    masks = [_zero_mask(w) for w in state.weights]
    if any(m.all() for m in masks):
        return _flint().arb(0)
    alive = [np.array([not _constant(state, k, i) for i in range(n)]) for k, n in enumerate(state.hidden)]
    changed = True
    while changed:
        changed = False
        for k in range(state.depth):
            rows_in = alive[k - 1] if k > 0 else np.ones(masks[k].shape[1], dtype=bool)
            rows_out = alive[k + 1] if k + 1 < state.depth else np.ones(masks[k + 1].shape[0], dtype=bool)
            dead = np.all(masks[k][:, rows_in], axis=1) | np.all(masks[k + 1][rows_out, :], axis=0)
            new = alive[k] & ~dead
            if not np.array_equal(new, alive[k]):
                alive[k] = new
                changed = True
            if not alive[k].any():
                return _flint().arb(0)
    raise _Reject("zero: the network is not constant (no zero layer, and no hidden layer whose neurons are all dead)")


def _check_split(state: _State, proof: Proof, net: Any):
    arb = _flint().arb
    size, n_weights = proof.split, len(state.weights)
    cuts = list(range(size, n_weights, size))
    if len(proof.pieces) != len(cuts) + 1 or len(proof.lipschitz) != len(cuts):
        raise _Reject(
            f"split: {len(proof.pieces)} pieces and {len(proof.lipschitz)} boundary constants, but pieces of {size} "
            f"of {n_weights} weight matrices need {len(cuts) + 1} and {len(cuts)}"
        )
    bound = arb(1)
    for cut, lip in zip(cuts, proof.lipschitz):
        need = _layer_lipschitz(state, cut - 1)
        if not (math.isfinite(lip) and arb(lip) >= need):
            raise _Reject(f"split: boundary constant {lip!r} is below the activations' Lipschitz constant {float(need):.17g}")
        bound = bound * arb(lip)
    for p, start in enumerate(range(0, n_weights, size)):
        stop = min(start + size, n_weights)
        piece = _State(
            list(state.weights[start:stop]),
            [list(x) for x in state.lows[start : stop - 1]],
            [list(x) for x in state.highs[start : stop - 1]],
        )
        bound = bound * _bound(piece, proof.pieces[p], net, top=False)
    return bound


def _check_compose(proof: Proof, net: Any, top: bool):
    arb = _flint().arb
    comp = getattr(net, "composition", None)
    if not top or comp is None or not comp.applies_to(net):
        raise _Reject("compose: the model as loaded is not factored by max pools (or the proof is not top-level)")
    if any(s.op != "pair" for s in proof.steps) or len(proof.steps) > 1:
        raise _Reject("compose: its only step may be one 'pair' (of the last part)")
    if len(proof.pieces) != len(comp.parts) or len(proof.lipschitz) != len(comp.multiplicities):
        raise _Reject(
            f"compose: {len(proof.pieces)} parts and {len(proof.lipschitz)} pool constants, but the model factors "
            f"into {len(comp.parts)} parts at {len(comp.multiplicities)} max pools"
        )
    parts = list(comp.parts)
    if proof.pools:  # weighted pools: every weight inequality exactly, then the weighted parts
        from lipsdp.compose import PoolWeights, weighted_parts, weights_hold

        if len(proof.pools) != len(comp.multiplicities) or len(comp.windows) != len(comp.multiplicities):
            raise _Reject(f"compose: {len(proof.pools)} weighted pools for {len(comp.multiplicities)} max pools")
        weights = tuple(PoolWeights(tuple(e), tuple(f)) for e, f in proof.pools)
        for i, w in enumerate(weights):
            reason = weights_hold(comp.windows[i], parts[i].weights[-1].shape[0], w)
            if reason is not None:
                raise _Reject(f"compose: the weights of max pool {i + 1} do not hold: {reason}")
        try:
            parts = weighted_parts(comp, weights)
        except ValueError as exc:
            raise _Reject(f"compose: {exc}") from None
    bound = arb(1)
    for i, (c, m) in enumerate(zip(proof.lipschitz, comp.multiplicities)):
        need = 1 if proof.pools else m
        if not (math.isfinite(c) and c >= 0 and arb(c) * arb(c) >= need):
            raise _Reject(f"compose: the constant {c!r} of max pool {i + 1} is below sqrt({need})"
                          + ("" if proof.pools else " (its multiplicity)"))
        bound = bound * arb(c)
    last = len(parts) - 1
    for i, (part, piece) in enumerate(zip(parts, proof.pieces)):
        state = _initial_state(part)
        if i == last and proof.steps:
            state = _pair(state, proof.steps[0])
        bound = bound * _bound(state, piece, part, top=False)
    return bound


def _bound(state: _State, proof: Proof, net: Any, top: bool):
    """An arb upper bound on the Lipschitz constant of the state's network, re-proved from `proof`."""
    if proof.kind == "compose":
        return _check_compose(proof, net, top)
    exponent = 0
    for index, step in enumerate(proof.steps):
        if step.op == "localize":
            if not top or index != 0:
                raise _Reject("a 'localize' step may only come first in the top-level proof")
            state = _localize(state, net, step)
        elif step.op == "pair":
            if not top:
                raise _Reject("a 'pair' step may only appear in the top-level proof")
            state = _pair(state, step)
        elif step.op == "keep":
            state = _prune(state, step)
        elif step.op == "fold":
            state = _fold(state, step)
        else:
            state, total = _scale(state, step)
            exponent += total
    if proof.kind == "lmi":
        bound = _check_lmi(state, proof)
    elif proof.kind == "product":
        bound = _check_product(state, proof)
    elif proof.kind == "zero":
        bound = _check_zero(state)
    elif proof.kind == "split":
        bound = _check_split(state, proof, net)
    else:
        raise _Reject(f"a '{proof.kind}' proof may only be the top-level proof")
    return bound * _pow2(-exponent)


# -- entry point --------------------------------------------------------------------------------------
def read_certificate(path: str | Path) -> CertificateFile:
    """Parse a certificate file; a missing, unreadable or malformed file is a `CertificateError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CertificateError(f"certificate file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CertificateError(f"cannot read the certificate {path}: {exc}") from None
    try:
        return parse_certificate(json.loads(text))
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise CertificateError(f"{path} is not a valid lipsdp certificate: {exc}") from None


# Bytes per ball-arithmetic entry the checker holds: one arb (48 bytes) and its products' temporaries.
ARB_ENTRY_BYTES = 192


def _check_size(net: Any) -> None:
    """Refuse up front (one LipSDPError, never a process killed mid-check) a network whose weights and LMI
    blocks, as balls, would not fit in the memory available (`lipsdp.memory.available_bytes`)."""
    from lipsdp.memory import available_bytes

    state = [net.weights[0].shape[1]] + [w.shape[0] for w in net.weights[:-1]]
    n_out = net.weights[-1].shape[0]
    if len(state) == 2 and _much_wider(state[0], state[1], n_out):  # `_eliminates`: the reduced matrix only
        blocks = (state[0] + n_out) ** 2
    else:
        blocks = sum(n * n for n in state) + sum(a * b for a, b in pairwise(state))
    entries = blocks + sum(int(np.prod(w.shape)) for w in net.weights)  # zeros included (CSR weights: not .size)
    available = available_bytes()
    if available is not None and entries * ARB_ENTRY_BYTES > available:
        raise LipSDPError(
            f"this network is too large for lipsdp verify's ball arithmetic: its weights and LMI blocks hold "
            f"{entries:.3g} entries, about {entries * ARB_ENTRY_BYTES / 2**30:.3g} GiB as balls, more than the "
            f"{available / 2**30:.3g} GiB available (LIPSDP_MEMORY_GIB overrides it); the bound itself was "
            "proved in float64 when it was made (lipsdp.certificate)"
        )


def verify(cert: str | Path, model: Any, *, prec: int = DEFAULT_PREC, **loader_options: Any) -> Verification:
    """Re-prove the certificate's bound for `model` (a file path or anything `lipsdp.load_network` takes)
    independently of the code that produced it; see the module docstring for what is proved and how.

    Returns a `Verification` (accepted or rejected, with the reason). A certificate or model file that
    cannot be read raises a `LipSDPError`. `prec` is the working precision of the ball arithmetic, bits."""
    start = time.perf_counter()
    data = read_certificate(cert)
    if not isinstance(prec, int) or prec < 64:
        raise CertificateError(f"prec must be an integer number of bits >= 64, got {prec!r}")
    net = load_network(model, **loader_options)
    proof = data.proof
    target = "f" if proof.pair is None else f"f_{proof.pair[0]} - f_{proof.pair[1]}"
    statement = f"Lipschitz constant of {target} " + ("on the certificate's region" if proof.local else "everywhere")

    def verdict(ok: bool, reason: str, proven: float | None = None) -> Verification:
        return Verification(ok, reason, data.upper, proven, statement, time.perf_counter() - start)

    if data.local != proof.local or data.pair != proof.pair:
        return verdict(False, f"the claim section (local={data.local}, pair={data.pair}) does not match what the "
                       f"proof bounds (local={proof.local}, pair={proof.pair})")
    if proof.kind != "compose":  # (a composition is checked part by part)
        _check_size(net)
    net = dense_weights(net)
    sha = network_sha256(net)
    if sha != data.sha256:
        return verdict(False, f"hash mismatch: the model's sha256 is {sha[:16]}..., the certificate is for "
                       f"{data.sha256[:16]}...; it is not the network the certificate was made for")
    flint = _flint()
    with flint.ctx.workprec(prec):
        try:
            state = None if proof.kind == "compose" else _initial_state(net)  # compose: its parts' states only
            bound = _bound(state, proof, net, top=True)
        except _Reject as exc:
            return verdict(False, str(exc))
        except (ValueError, TypeError, IndexError, ZeroDivisionError) as exc:
            return verdict(False, f"malformed proof ({type(exc).__name__}: {exc})")
        proven = _up(bound)
        if not bound.upper() <= flint.arb(data.upper):
            return verdict(False, f"the claimed upper bound {data.upper!r} is below the proved bound {proven!r}", proven)
    return verdict(True, f"proved {statement} <= {proven!r} <= claimed {data.upper!r} ({proof.kind} proof)", proven)
