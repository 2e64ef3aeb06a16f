"""Class-pair Lipschitz bounds and certified robustness of classifiers.

For logits f, the margin f_c - f_j of the predicted class c over class j changes by at most L_cj * ||d||
when the input moves by d, where L_cj is a Lipschitz bound of f_c - f_j (the network with its last layer
replaced by the difference of rows c and j). So no input within l2 distance min_j (f_c - f_j) / L_cj can
change the prediction. A global bound L gives L_cj <= sqrt(2) L, hence the radius margin / (sqrt(2) L).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lipsdp.certificate import certified_product
from lipsdp.errors import LipSDPError
from lipsdp.lower import TorchChain
from lipsdp.network import Network, pair_network

log = logging.getLogger(__name__)


def _pair_task(net: Network, pair: tuple[int, int], method: str, options: dict[str, Any]):
    """Module-level task: the verified bound of one class pair."""
    from lipsdp.api import estimate

    return estimate(net, method, pair=pair, **options)


def pair_bounds(
    model: Any,
    pairs: Iterable[Sequence[int]] | None = None,
    method: str = "neuron",
    *,
    workers: int = 1,
    executor: Executor | None = None,
    input_shape: tuple[int, ...] | None = None,
    **options: Any,
) -> dict[tuple[int, int], Any]:
    """Verified Lipschitz bounds of f_i - f_j for each pair (default: all i < j), in parallel if asked.

    Returns {(i, j): Result}. `options` go to `lipsdp.estimate` (solver, split, region, ...).
    """
    from lipsdp.io import load_network
    from lipsdp.parallel import run_all

    net = load_network(model, **({} if input_shape is None else {"input_shape": input_shape}))
    n_out = net.sizes[-1]
    if pairs is None:
        pairs = [(i, j) for i in range(n_out) for j in range(i + 1, n_out)]
    pairs = [tuple(int(v) for v in p) for p in pairs]
    for p in pairs:
        pair_network(net, p)  # validate before starting any work
    results = run_all(_pair_task, [(net, p, method, options) for p in pairs], workers=workers, executor=executor)
    return dict(zip(pairs, results))


@dataclass(frozen=True)
class Certification:
    """Certified l2 radii of a labelled data set.

    radii        per input: no perturbation of smaller l2 norm changes the prediction (0 if misclassified)
    predictions  predicted classes; `labels` the true ones; `correct` = predictions == labels
    bounds       the verified Lipschitz bounds used: {(i, j): L_ij} for bound='pair', {'global': L} otherwise
    The bounds are verified; the margins come from float64 logits, and each radius is rounded down.
    """

    radii: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    bound: str
    method: str
    bounds: dict = field(repr=False)
    seconds: float = 0.0

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.correct)) if self.labels.size else float("nan")

    def certified_accuracy(self, radius: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Fraction of inputs classified correctly AND certified at l2 radius `radius` (or each of several)."""
        r = np.asarray(radius, dtype=np.float64)
        ok = self.correct[:, None] & (self.radii[:, None] >= r.reshape(1, -1))
        acc = ok.mean(axis=0) if self.labels.size else np.full(r.size, np.nan)
        return float(acc[0]) if r.ndim == 0 else acc.reshape(r.shape)

    def to_dict(self, radii: Sequence[float] = ()) -> dict[str, Any]:
        """JSON-ready: radii, certified accuracy at each of `radii`, and the bounds used."""
        return {
            "radii": [float(r) for r in self.radii],
            "certified_accuracy": {f"{r:g}": float(self.certified_accuracy(r)) for r in radii},
            "clean_accuracy": self.clean_accuracy,
            "bound": self.bound,
            "method": self.method,
            "lipschitz": {(k if isinstance(k, str) else f"{k[0]}-{k[1]}"): v for k, v in self.bounds.items()},
            "seconds": self.seconds,
        }


def _round_down(x: np.ndarray) -> np.ndarray:
    """A few ulps towards zero, covering the rounding of the division."""
    return np.maximum(x * (1.0 - 4 * np.finfo(np.float64).eps), 0.0)


def certify(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: str = "neuron",
    bound: str = "pair",
    workers: int = 1,
    executor: Executor | None = None,
    input_shape: tuple[int, ...] | None = None,
    **options: Any,
) -> Certification:
    """Certified l2 robustness radii of the classifier `model` on inputs x (N, ...) with labels y (N,).

    bound='pair' bounds f_c - f_j for every predicted class c and every other class j (tighter, one
    bound per needed pair, run in parallel with `workers` / `executor`); bound='global' uses one bound L
    of the whole logit map and the radius margin / (sqrt(2) L). `options` go to `lipsdp.estimate`.
    """
    from lipsdp.api import estimate
    from lipsdp.io import load_network

    start = time.perf_counter()
    if bound not in ("pair", "global"):
        raise LipSDPError(f"bound must be 'pair' or 'global', got {bound!r}")
    net = load_network(model, **({} if input_shape is None else {"input_shape": input_shape}))
    n_in, n_out = net.sizes[0], net.sizes[-1]
    if n_out < 2:
        raise LipSDPError(f"certification needs a classifier with at least 2 outputs; this network has {n_out}")
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(y).reshape(-1)
    if x.ndim == 0 or x.shape[0] != labels.size:
        raise LipSDPError(f"x has {x.shape[0] if x.ndim else 0} inputs but y has {labels.size} labels")
    x = x.reshape(labels.size, -1)
    if x.shape[1] != n_in:
        raise LipSDPError(f"each input has {x.shape[1]} values but the network takes {n_in}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise LipSDPError("labels y must be integer class indices")
        labels = labels.astype(np.int64)
    if np.any((labels < 0) | (labels >= n_out)):
        raise LipSDPError(f"labels must lie in 0..{n_out - 1}")
    logits = net.forward(x)
    pred = np.argmax(logits, axis=1)
    correct = pred == labels
    top = logits[np.arange(labels.size), pred]
    radii = np.zeros(labels.size)
    if bound == "global":
        lip = estimate(net, method, workers=workers, executor=executor, **options).upper
        bounds: dict = {"global": lip}
        others = logits.copy()
        others[np.arange(labels.size), pred] = -np.inf
        margin = top - others.max(axis=1)
        with np.errstate(divide="ignore"):
            r = np.where(margin > 0, margin / (np.sqrt(2.0) * lip), 0.0) if lip > 0 else np.where(margin > 0, np.inf, 0.0)
        radii = np.where(correct, _round_down(r), 0.0)
    else:
        classes = sorted(set(pred[correct].tolist()))
        needed = sorted({(min(c, j), max(c, j)) for c in classes for j in range(n_out) if j != c})
        log.info("certify: %d class pairs to bound", len(needed))
        results = pair_bounds(net, needed, method, workers=workers, executor=executor, **options)
        bounds = {p: r.upper for p, r in results.items()}
        lip = np.full((n_out, n_out), np.inf)
        for (i, j), value in bounds.items():
            lip[i, j] = lip[j, i] = value
        for idx in np.flatnonzero(correct):
            c = pred[idx]
            margins = logits[idx, c] - np.delete(logits[idx], c)
            ls = np.delete(lip[c], c)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_pair = np.where(margins <= 0, 0.0, np.where(ls > 0, margins / ls, np.inf))
            radii[idx] = _round_down(np.min(per_pair))
    return Certification(
        radii=radii,
        predictions=pred,
        labels=labels,
        bound=bound,
        method=method,
        bounds=bounds,
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class PropertyCertificate:
    """Whether the Lipschitz margin certifies one robustness property (an input box, a label).

    Every input of the box lies within l2 distance `radius` of its centre x0, so the label's logit stays
    the largest on the whole box if f_label(x0) - f_j(x0) > L_j * radius for every target class j, with
    L_j a verified Lipschitz bound of f_label - f_j (global, or valid on the box for bound='local').
    certified=False means the margin argument is not enough, not that the property is false.
    """

    path: str
    label: int
    predicted: int
    radius: float
    certified: bool
    bound: str
    method: str
    margins: dict[int, float] = field(repr=False)
    lipschitz: dict[int, float] = field(repr=False)
    seconds: float = 0.0
    # A class j for which no Lipschitz bound at all can certify the property (`secant_floors`: a secant of
    # f_label - f_j inside the box is already steeper than margin_j / radius), else None. Local solves are
    # skipped for such a property.
    beyond_reach: int | None = None
    # That class's secant slope: a lower bound on every Lipschitz bound of f_label - f_beyond on the box.
    secant_floor: float | None = None

    @property
    def slack(self) -> float:
        """min_j margin_j - L_j * radius over the classes bounded so far (positive when certified; the
        smallest margin when no bound was needed because the centre is not classified as the label; beyond
        reach, and no bound computed: the slack the tightest possible bound would leave, which is <= 0)."""
        if not self.margins:
            return float("-inf")
        if not self.lipschitz and self.beyond_reach is not None and self.secant_floor is not None:
            return self.margins[self.beyond_reach] - self.secant_floor * self.radius
        if not self.lipschitz:
            return min(self.margins.values())
        return min(self.margins[j] - self.lipschitz[j] * self.radius for j in self.lipschitz)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "property": self.path,
            "label": self.label,
            "predicted": self.predicted,
            "radius": self.radius,
            "certified": self.certified,
            "slack": self.slack,
            "bound": self.bound,
            "method": self.method,
            "margins": {str(j): v for j, v in self.margins.items()},
            "lipschitz": {str(j): v for j, v in self.lipschitz.items()},
            "beyond_reach": self.beyond_reach,
            "secant_floor": self.secant_floor,
            "seconds": self.seconds,
        }


def secant_floors(
    net: Network, low: np.ndarray, high: np.ndarray, label: int, targets: Sequence[int],
    chain: TorchChain | None = None,
) -> dict[int, float]:
    """For each class j, a lower bound on the Lipschitz constant of f_label - f_j on the box [low, high]:
    the secant slope |m(x+) - m(x-)| / ||x+ - x-|| of the margin m = f_label - f_j between two points of the
    box, x+- = centre +- h d along the margin's gradient d at the centre (coordinates of zero width left
    out, h as large as the box allows), reduced by an allowance for the rounding of the two evaluations.

    Every Lipschitz bound of f_label - f_j valid on the box is at least this, so when it exceeds
    margin_j / radius no Lipschitz margin (global, class-pair or local, however tight) can certify the
    property. It is only ever used to give up early, never to certify. `chain`: `TorchChain(net)` when
    called for many boxes of one network."""
    import torch

    chain = TorchChain(net) if chain is None else chain
    centre = 0.5 * (low + high)
    half = 0.5 * (high - low)
    jac = chain.jacobians(torch.as_tensor(centre[:, None], dtype=torch.float64), None)[0].numpy()
    points, pairs = [], []
    for j in targets:
        d = np.where(half > 0, jac[label] - jac[j], 0.0)
        free = d != 0
        if not np.any(free):
            continue
        h = float(np.min(half[free] / np.abs(d[free])))
        plus, minus = np.clip(centre + h * d, low, high), np.clip(centre - h * d, low, high)
        if np.array_equal(plus, minus):
            continue
        points += [plus, minus]
        pairs.append(j)
    floors = {j: 0.0 for j in targets}
    if not pairs:
        return floors
    pts = np.array(points)
    ys = net.forward(pts)
    for i, j in enumerate(pairs):
        y_plus, y_minus = ys[2 * i], ys[2 * i + 1]
        rise = abs((y_plus[label] - y_plus[j]) - (y_minus[label] - y_minus[j]))
        allowance = 1e-9 * float(np.sum(np.abs(y_plus)) + np.sum(np.abs(y_minus)))  # float64 evaluation, generous
        floors[j] = max(rise - allowance, 0.0) / float(np.linalg.norm(pts[2 * i] - pts[2 * i + 1]))
    return floors


def _clears(margin: float, lipschitz: float, radius: float) -> bool:
    """True when the margin exceeds (rounded up) Lipschitz bound x radius: no point of the box can cross."""
    return margin > np.nextafter(lipschitz * radius, np.inf)


def _pair_bounds_in_rounds(
    net: Network, props: list, checks: list, hopeful: list[bool], method: str, workers: int,
    executor: Executor | None, options: dict[str, Any],
) -> dict[tuple[int, int], float]:
    """The class-pair bounds `certify_properties` needs: in rounds, the next class (smallest margin first) of
    every property still open, each new pair solved once (in parallel) and shared; a property closes at its
    first class whose bound fails or after its last class."""
    values: dict[tuple[int, int], float] = {}
    cursor = {i: 0 for i, h in enumerate(hopeful) if h and checks[i][1]}  # property -> position in its order
    while cursor:
        wanted = {}
        for i, at in cursor.items():
            label, j = props[i].label, checks[i][1][at]
            wanted[i] = (min(label, j), max(label, j))
        new = sorted(set(wanted.values()) - set(values))
        log.info("certify_properties: %d class pairs to bound in this round", len(new))
        values.update({pair: r.upper for pair, r in pair_bounds(net, new, method, workers=workers,
                                                                 executor=executor, **options).items()})
        for i, pair in wanted.items():
            margins, order = checks[i][0], checks[i][1]
            passed = _clears(margins[order[cursor[i]]], values[pair], props[i].l2_radius)
            if passed and cursor[i] + 1 < len(order):
                cursor[i] += 1
            else:
                del cursor[i]
    return values


def certify_properties(
    model: Any,
    properties: Iterable[Any],
    *,
    method: str = "sequential",
    bound: str = "pair",
    workers: int = 1,
    executor: Executor | None = None,
    input_shape: tuple[int, ...] | None = None,
    **options: Any,
) -> list[PropertyCertificate]:
    """Check VNN-LIB robustness properties (paths, or `lipsdp.io.vnnlib.VnnlibProperty`) by Lipschitz margins.

    bound='pair': one verified bound of f_label - f_j per class pair, shared by all properties (cheap when
    there are many properties), solved only where a margin can still prove the property: none for a centre
    that is misclassified or a box beyond reach (`secant_floors`), and a property's classes smallest margin
    first, stopping at the first that fails (in rounds, each round's new pairs in parallel);
    bound='global': one verified bound L of the whole f, and sqrt(2) L for every f_label - f_j
    (||e_label - e_j|| = sqrt(2); one solve in all: the choice for large networks);
    bound='local': a bound of f_label - f_j valid on each property's box (`estimate(..., region=Box(low,
    high), pair=...)`, tighter, one per property and target, smallest margin first, stopping at the first
    class that fails). The
    certificate is sound: a certified property has no counter-example in its box. Margins come from float64
    logits at the box centre, reduced by a rounding allowance before the comparison.
    """
    from lipsdp.api import estimate
    from lipsdp.io import load_network
    from lipsdp.io.vnnlib import VnnlibProperty, read_vnnlib
    from lipsdp.region import Box

    if bound not in ("pair", "global", "local"):
        raise LipSDPError(f"bound must be 'pair', 'global' or 'local' for VNN-LIB properties, got {bound!r}")
    net = load_network(model, **({} if input_shape is None else {"input_shape": input_shape}))
    props = [p if isinstance(p, VnnlibProperty) else read_vnnlib(p) for p in properties]
    n_in, n_out = net.sizes[0], net.sizes[-1]
    for prop in props:
        if prop.low.size != n_in or prop.n_outputs != n_out:
            raise LipSDPError(
                f"{prop.path}: the property has {prop.low.size} inputs and {prop.n_outputs} outputs, the network "
                f"{n_in} and {n_out}"
            )
        if prop.label is None:
            raise LipSDPError(
                f"{prop.path}: not a robustness property (the output condition is not 'some Y_j >= Y_label'); "
                "lipsdp certifies classification robustness only"
            )
    logits = net.forward(np.array([p.center for p in props])) if props else np.zeros((0, n_out))
    tiny = 64 * np.finfo(np.float64).eps
    chain = None  # the network in torch, for the secants (built once, on first use)
    checks = []  # per property: margins, classes smallest margin first, a class beyond reach, its floor, seconds
    # a bound is only worth its solve where it can still certify: a property whose centre is misclassified,
    # or that no Lipschitz margin can prove (beyond reach), needs none
    hopeful = []
    for prop, y in zip(props, logits):
        start = time.perf_counter()
        label = prop.label
        margins = {j: float(y[label] - y[j] - tiny * (abs(y[label]) + abs(y[j]))) for j in prop.targets}
        # smallest margin first: the class most likely to fail, so an uncertifiable property costs one local
        # solve instead of up to one per class (a CIFAR CNN: about 35 s each)
        order = sorted(prop.targets, key=margins.__getitem__)
        beyond, floor = None, None
        reachable = int(np.argmax(y)) == label and all(m > 0 for m in margins.values())
        if reachable:
            chain = TorchChain(net) if chain is None else chain
            floors = secant_floors(net, prop.low, prop.high, label, prop.targets, chain)
            beyond = next((j for j in order if floors[j] * prop.l2_radius >= margins[j]), None)
            floor = None if beyond is None else floors[beyond]
        checks.append((margins, order, beyond, floor, time.perf_counter() - start))
        hopeful.append(reachable and beyond is None)
    pair_values: dict[tuple[int, int], float] = {}
    if bound == "pair":
        pair_values = _pair_bounds_in_rounds(net, props, checks, hopeful, method, workers, executor, options)
    whole = None
    if bound == "global" and any(int(np.argmax(y)) == p.label for p, y in zip(props, logits)):
        upper = estimate(net, method, workers=workers, executor=executor, **options).upper
        whole = certified_product([upper, math.nextafter(math.sqrt(2.0), math.inf)])
    out = []
    for prop, y, (margins, order, beyond, floor, seconds), certified in zip(props, logits, checks, hopeful):
        start = time.perf_counter()
        label, predicted = prop.label, int(np.argmax(y))
        lipschitz: dict[int, float] = {}
        paid = bound == "global" and predicted == label
        for j in order:
            if not (certified or paid):
                break  # pair and local bounds cost a solve each: stop at the first class that fails
            if bound == "global":
                lipschitz[j] = whole  # already paid for: reported even where it cannot certify
            elif bound == "pair":
                lipschitz[j] = pair_values[(min(label, j), max(label, j))]
            else:
                lipschitz[j] = estimate(net, method, pair=(label, j), region=Box(prop.low, prop.high),
                                        workers=workers, executor=executor, **options).upper
            certified = certified and _clears(margins[j], lipschitz[j], prop.l2_radius)
        seconds += time.perf_counter() - start
        out.append(PropertyCertificate(prop.path, label, predicted, prop.l2_radius, bool(certified), bound,
                                       method, margins, lipschitz, seconds, beyond, floor))
    return out
