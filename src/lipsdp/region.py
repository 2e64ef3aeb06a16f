"""Input regions and local slope bounds: Lipschitz bounds valid on a box or a ball instead of everywhere.

Interval bound propagation (IBP) gives every hidden neuron a range [l, u] of pre-activations over the
region. Between two inputs of the region the neuron's secant slope is then a mean of phi' over [l, u], so
it lies in [min phi', max phi'] over that interval: a ReLU that is always on gets alpha = beta = 1, one that
is always off alpha = beta = 0, a tanh neuron the smallest and largest derivative on its interval. With
these per-neuron slopes (`Network.with_slopes`) every method's verified bound is a verified bound on the
Lipschitz constant of the network restricted to the region. IBP rounds outward, so the ranges contain the
exact ones despite floating-point arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lipsdp.activations import Mixed, Reflect, neuron_mask, select_neurons
from lipsdp.errors import InvalidNetworkError, LipSDPError
from lipsdp.network import Network, apply_activation
from lipsdp.weights import row_norms, scale_columns

_U = np.finfo(np.float64).eps / 2  # unit roundoff
_TINY = np.finfo(np.float64).tiny


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term dot product."""
    return n * _U / (1.0 - n * _U)


class Region(Protocol):
    """What `estimate(..., region=...)` and `lower_bound(..., region=...)` need of an input set."""

    def with_dim(self, n: int) -> Region: ...

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...

    def project(self, x: np.ndarray) -> np.ndarray: ...

    def first_layer_range(self, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> str: ...


def _vector(value, name: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise LipSDPError(f"{name} must be finite numbers")
    return arr


def _resize(arr: np.ndarray, n: int, name: str, what: str) -> np.ndarray:
    if arr.size == 1:
        return np.full(n, float(arr[0]))
    if arr.size != n:
        raise LipSDPError(f"{what}: {name} has {arr.size} entries but the network has {n} inputs")
    return arr


def _affine_range(w: np.ndarray, b: np.ndarray, mid: np.ndarray, rad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outward-rounded bounds of w x + b over the box |x - mid| <= rad."""
    abs_w = np.abs(w)
    centre = w @ mid + b
    spread = abs_w @ rad
    slack = 2.0 * _gamma(w.shape[1] + 2) * (abs_w @ (np.abs(mid) + rad) + np.abs(b)) + w.shape[1] * _TINY
    return centre - spread - slack, centre + spread + slack


@dataclass(frozen=True, init=False)
class Box:
    """The box low <= x <= high (coordinatewise; scalars apply to every input)."""

    low: np.ndarray
    high: np.ndarray

    def __init__(self, low, high) -> None:
        low, high = _vector(low, "Box low"), _vector(high, "Box high")
        if low.size != high.size and 1 not in (low.size, high.size):
            raise LipSDPError(f"Box: low has {low.size} entries but high has {high.size}")
        low, high = np.broadcast_arrays(low, high)
        if np.any(low > high):
            raise LipSDPError("Box: every entry of low must be <= the matching entry of high")
        object.__setattr__(self, "low", np.array(low))
        object.__setattr__(self, "high", np.array(high))

    def with_dim(self, n: int) -> Box:
        """The same box with one (low, high) pair per input (scalars broadcast)."""
        return Box(_resize(self.low, n, "low", "Box"), _resize(self.high, n, "high", "Box"))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n points drawn uniformly from the box."""
        return self.low + (self.high - self.low) * rng.random((n, self.low.size))

    def project(self, x: np.ndarray) -> np.ndarray:
        """The nearest point(s) of the box (clipping is exact in floating point)."""
        return np.clip(x, self.low, self.high)

    def contains(self, x: np.ndarray) -> np.ndarray:
        return np.all((x >= self.low) & (x <= self.high), axis=-1)

    def first_layer_range(self, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mid = 0.5 * (self.low + self.high)
        rad = np.maximum(self.high - mid, mid - self.low)
        return _affine_range(w, b, mid, np.nextafter(rad, np.inf))

    def describe(self) -> str:
        if self.low.size == 1 or (np.ptp(self.low) == 0 and np.ptp(self.high) == 0):
            return f"box [{self.low[0]:g}, {self.high[0]:g}]^{self.low.size}"
        return f"box of {self.low.size} intervals, widths {np.min(self.high - self.low):g}..{np.max(self.high - self.low):g}"


@dataclass(frozen=True, init=False)
class Ball:
    """The l2 ball ||x - center||_2 <= eps."""

    center: np.ndarray
    eps: float

    def __init__(self, center, eps: float) -> None:
        center = _vector(center, "Ball center")
        eps = float(eps)
        if not np.isfinite(eps) or eps < 0:
            raise LipSDPError(f"Ball: eps must be a finite number >= 0, got {eps}")
        object.__setattr__(self, "center", np.array(center))
        object.__setattr__(self, "eps", eps)

    def with_dim(self, n: int) -> Ball:
        if self.center.size != n:
            raise LipSDPError(f"Ball: center has {self.center.size} entries but the network has {n} inputs")
        return self

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n points drawn uniformly from the ball."""
        d = self.center.size
        direction = rng.standard_normal((n, d))
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), _TINY)
        return self.project(self.center + direction * (self.eps * rng.random((n, 1)) ** (1.0 / d)))

    def project(self, x: np.ndarray) -> np.ndarray:
        """The nearest point(s) of the ball, pulled in by a few ulps so they are inside after rounding."""
        x = np.asarray(x, dtype=np.float64)
        offset = x - self.center
        norm = np.linalg.norm(offset, axis=-1, keepdims=True)
        limit = self.eps * (1.0 - 1e-12)
        scale = np.where(norm > limit, limit / np.maximum(norm, _TINY), 1.0)
        return self.center + offset * scale

    def contains(self, x: np.ndarray) -> np.ndarray:
        return np.linalg.norm(np.asarray(x) - self.center, axis=-1) <= self.eps

    def first_layer_range(self, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """w x + b over the ball: centre value +- eps * ||row||_2 (tighter than the bounding box)."""
        lo, hi = _affine_range(w, b, self.center, np.zeros_like(self.center))
        spread = self.eps * row_norms(w) * (1.0 + _gamma(w.shape[1] + 4)) + _TINY
        return lo - spread, hi + spread

    def describe(self) -> str:
        return f"l2 ball of radius {self.eps:g} in {self.center.size} dimensions"


def _outward(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Widen by a few ulps to cover the rounding of library activation functions."""
    pad = 8.0 * _U
    return lo - pad * np.abs(lo) - _TINY, hi + pad * np.abs(hi) + _TINY


def as_region(region: Region, n: int) -> Region:
    """Check that `region` is a usable input set for an n-input network and broadcast it to n inputs."""
    needed = ("with_dim", "sample", "project", "first_layer_range", "describe")
    missing = [m for m in needed if not callable(getattr(region, m, None))]
    if missing:
        raise LipSDPError(
            f"region must be a lipsdp.Box or lipsdp.Ball (an object of type {type(region).__name__} lacks "
            f"{', '.join(missing)})"
        )
    return region.with_dim(n)


def pre_activation_bounds(net: Network, region: Region) -> list[tuple[np.ndarray, np.ndarray]]:
    """IBP ranges [l_k, u_k] of the pre-activations of each hidden layer over the region (outward-rounded)."""
    region = as_region(region, net.sizes[0])
    bounds = []
    lo, hi = region.first_layer_range(net.weights[0], net.biases[0])
    for k in range(net.depth):
        bounds.append((lo, hi))
        act = net.activations[k]
        if "+" in (act.base if isinstance(act, Mixed) else act).name:
            raise LipSDPError(
                f"hidden layer {k + 1} has the composed activation {act.name}; local bounds need the activation "
                "functions themselves (remove one of the two consecutive activations)"
            )
        # Every supported activation but |.| is monotone non-decreasing: the image of [l, u] is
        # [phi(l), phi(u)]; |.| maps it to [0, max(-l, u)] when l < 0 < u, else to its ends' magnitudes.
        out_lo, out_hi = _outward(apply_activation(act, lo), apply_activation(act, hi))
        flip = neuron_mask(act) if isinstance(act, Reflect) else np.full(lo.shape, act.name == "abs")
        if np.any(flip):
            mag_lo = np.where((lo < 0) & (hi > 0), 0.0, np.minimum(np.abs(lo), np.abs(hi)))
            out_lo = np.where(flip, mag_lo, out_lo)
            out_hi = np.where(flip, np.maximum(np.abs(lo), np.abs(hi)), out_hi)
        if k + 1 < net.depth:
            w, b = net.weights[k + 1], net.biases[k + 1]
            mid = 0.5 * (out_lo + out_hi)
            rad = np.nextafter(np.maximum(out_hi - mid, mid - out_lo), np.inf)
            lo, hi = _affine_range(w, b, mid, rad)
    return bounds


def _sech2(x: np.ndarray) -> np.ndarray:
    """1 / cosh(x)^2 = 4 e^{-2|x|} / (1 + e^{-2|x|})^2, accurate for large |x|."""
    e = np.exp(-2.0 * np.abs(x))
    return 4.0 * e / (1.0 + e) ** 2


def slope_range(name: str, param: float | None, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[min phi', max phi'] over each interval [lo, hi] (before the final safety rounding)."""
    if name == "relu":
        return (lo >= 0).astype(float), (hi > 0).astype(float)
    if name == "leaky_relu":
        return np.where(lo >= 0, 1.0, param), np.where(hi > 0, 1.0, param)
    if name == "identity":
        return np.ones_like(lo), np.ones_like(lo)
    if name == "abs":
        return np.where(hi <= 0, -1.0, np.where(lo >= 0, 1.0, -1.0)), np.where(lo >= 0, 1.0, np.where(hi <= 0, -1.0, 1.0))
    if name in ("tanh", "sigmoid"):
        # Both derivatives are even and decreasing in |x|: extremes at the ends, peak at 0 if inside.
        scale, factor = (1.0, 1.0) if name == "tanh" else (0.5, 0.25)
        d = lambda x: factor * _sech2(scale * x)
        return np.minimum(d(lo), d(hi)), d(np.clip(0.0, lo, hi))
    if name == "softplus":
        sig = lambda x: 0.5 * (1.0 + np.tanh(0.5 * x))  # softplus' = sigmoid, increasing
        return sig(lo), sig(hi)
    if name == "elu":
        # elu'(x) = param * e^x (increasing) for x < 0 and 1 for x > 0.
        neg_lo, neg_hi = param * np.exp(np.minimum(lo, 0.0)), param * np.exp(np.minimum(hi, 0.0))
        alpha = np.where(lo >= 0, 1.0, np.where(hi <= 0, neg_lo, np.minimum(neg_lo, 1.0)))
        beta = np.where(lo >= 0, 1.0, np.where(hi <= 0, neg_hi, np.maximum(param, 1.0)))
        return alpha, beta
    raise InvalidNetworkError(f"no local slope bounds for activation {name}")


@dataclass(frozen=True)
class LocalNetwork:
    """The network with slopes valid on the region, and how many neurons became linear there."""

    network: Network
    region: Region
    bounds: list[tuple[np.ndarray, np.ndarray]]
    fixed: int
    tightened: int
    total: int
    removed: int = 0
    kept: tuple[np.ndarray, ...] = ()  # per hidden layer: indices of the neurons kept (constant ones dropped)
    zeroed: tuple[int, ...] = ()  # hidden layers whose every neuron is constant: one kept, outgoing column zeroed

    def note(self) -> str:
        return (
            f"region: {self.region.describe()}; interval bounds tighten the slopes of {self.tightened} of "
            f"{self.total} hidden neurons ({self.fixed} become linear, {self.removed} of them constant and "
            "removed); the bound holds for inputs in the region only"
        )


def localize(net: Network, region: Region) -> LocalNetwork:
    """`net` with per-neuron slope bounds valid for inputs in `region` (intersected with the current ones).

    The returned network equals `net` on the region (constant neurons are removed), not necessarily outside.
    """
    region = as_region(region, net.sizes[0])
    bounds = pre_activation_bounds(net, region)
    alphas, betas = [], []
    fixed = tightened = 0
    for k, (lo, hi) in enumerate(bounds):
        act = net.activations[k]
        if isinstance(act, Reflect):
            # kept at the declared [-1, 1]: narrowing the identity neurons to [1, 1] would trade the
            # constraint that makes norm-preserving layers exact (see Reflect) for a weaker one
            alphas.append(net.alphas[k])
            betas.append(net.betas[k])
            continue
        base = act.base if isinstance(act, Mixed) else act
        a, b = slope_range(base.name, base.param, lo, hi)
        if base.name not in ("relu", "leaky_relu", "identity", "abs"):
            # Round the smooth cases outward; the piecewise-linear values 0, 1, param are exact.
            a, b = a * (1.0 - 1e-12), b * (1.0 + 1e-12) + _TINY
        if isinstance(act, Mixed):  # pass-through neurons: the identity, slope exactly 1
            a, b = np.where(act.mask(), 1.0, a), np.where(act.mask(), 1.0, b)
        a = np.maximum(a, net.alphas[k])
        b = np.minimum(b, net.betas[k])
        a = np.minimum(a, b)
        fixed += int(np.sum(a == b))
        tightened += int(np.sum((a > net.alphas[k]) | (b < net.betas[k])))
        alphas.append(a)
        betas.append(b)
    local, removed, kept, zeroed = _drop_constant_neurons(net.with_slopes(alphas, betas), bounds)
    return LocalNetwork(local, region, bounds, fixed, tightened, net.n_neurons, removed, kept, zeroed)


def _drop_constant_neurons(
    net: Network, bounds: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[Network, int, tuple[np.ndarray, ...], tuple[int, ...]]:
    """Remove neurons with slope exactly 0 on the region (e.g. ReLUs that are always off): their output is a
    constant there, folded into the next bias. Exact on the region, and it shrinks the LMI. A layer keeps at
    least one neuron (with its outgoing weights zeroed if all are constant). Also returns the indices kept
    per layer and the layers whose kept neuron had its outgoing column zeroed."""
    from dataclasses import replace

    ws, bs = list(net.weights), list(net.biases)
    als, bes, acts = list(net.alphas), list(net.betas), list(net.activations)
    removed = 0
    kept = [np.arange(n) for n in net.hidden_sizes]
    zeroed = []
    for k in range(net.depth):
        const = (als[k] == 0) & (bes[k] == 0)
        if not const.any():
            continue
        value = apply_activation(net.activations[k], bounds[k][0])  # phi is constant on [l, u]
        bs[k + 1] = bs[k + 1] + ws[k + 1][:, const] @ value[const]
        keep = ~const
        if not keep.any():
            keep[0] = True
            ws[k + 1] = scale_columns(ws[k + 1], np.r_[0.0, np.ones(ws[k + 1].shape[1] - 1)])  # column 0 zeroed
            zeroed.append(k)
        kept[k] = kept[k][keep]
        removed += int(np.sum(~keep))
        ws[k], bs[k], als[k], bes[k] = ws[k][keep], bs[k][keep], als[k][keep], bes[k][keep]
        acts[k] = select_neurons(acts[k], keep)
        ws[k + 1] = ws[k + 1][:, keep]
    local = replace(net, weights=tuple(ws), biases=tuple(bs), activations=tuple(acts), alphas=tuple(als),
                    betas=tuple(bes))
    return local, removed, tuple(kept), tuple(zeroed)
