"""Rebuild the LipSDP paper's experiments (Fazlyab et al. 2019) as tables, figures and a Markdown report.

Three experiments, all seeded and deterministic:
1. `random_networks`: verified bounds (naive, sequential, layer, neuron, ...) and a lower bound for random
   ReLU networks against depth and width, with computation times.
2. `trained_classifiers`: small ReLU classifiers (Iris, 8x8 digits, optionally MNIST) trained normally and
   with FGSM / PGD adversarial training at several eps; their bounds next to test accuracy.
3. `robustness`: certified l2 accuracy from the global bound (margin / (sqrt2 L)), from class-pair bounds
   and from local bounds on a ball around each point, beside the accuracy a PGD attack leaves.
`run` does all three and writes REPORT.md, results.json and PNG figures. Every upper bound shown is
verified (`lipsdp.estimate`); lower bounds are Jacobian norms at real inputs; attack accuracies are
empirical ceilings, not guarantees.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lipsdp.api import estimate
from lipsdp.errors import LipSDPError
from lipsdp.methods import available_methods
from lipsdp.network import Network

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
BASE_METHODS = ("naive", "sequential", "layer", "neuron")
SDP_METHODS = ("layer", "neuron", "neuron-dense")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomConfig:
    """Random ReLU networks: weights N(0, 1/n_in), input `n_in`, output `n_out`, one net per seed."""

    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    depth_width: int = 16
    widths: tuple[int, ...] = (8, 16, 24, 32)
    width_depth: int = 2
    n_in: int = 10
    n_out: int = 2
    seeds: tuple[int, ...] = (0, 1)
    lower_samples: int = 128
    lower_steps: int = 30


@dataclass(frozen=True)
class ClassifierConfig:
    """One data set, its architecture, training budget, the eps of adversarial training, and the l2 radii
    of the robustness experiment (in the units of the preprocessed inputs)."""

    dataset: str
    hidden: tuple[int, ...]
    epochs: int
    eps: tuple[float, ...]
    radii: tuple[float, ...]
    train_norm: str = "linf"
    batch_size: int = 64
    lr: float = 1e-2
    pgd_steps: int = 7
    robust_points: int = 100
    local_points: int = 40
    pair_method: str = "neuron"
    local_method: str = "neuron"


@dataclass(frozen=True)
class ReproduceConfig:
    """Everything `run` does. `sdp_limit`: layer/neuron are skipped (and the skip reported) on networks whose
    LMI (inputs + hidden neurons) is larger, to keep the run within minutes with the current SDP solver."""

    random: RandomConfig = RandomConfig()
    classifiers: tuple[ClassifierConfig, ...] = ()
    methods: tuple[str, ...] = ()
    sdp_limit: int = 140
    attack_steps: int = 50
    attack_restarts: int = 2
    lower_samples: int = 256
    lower_steps: int = 40
    seed: int = 0
    workers: int = 1
    quick: bool = False


def default_config(quick: bool = False, mnist: str | Path | None = None) -> ReproduceConfig:
    """The full run (a few minutes on 2 cores) or the quick one (well under a minute)."""
    methods = tuple(m for m in (*BASE_METHODS[:2], "anytime", *BASE_METHODS[2:]) if m in available_methods())
    if quick:
        random = RandomConfig(depths=(1, 2, 3), depth_width=8, widths=(4, 8, 12), seeds=(0,), lower_samples=64,
                              lower_steps=10)
        classifiers: list[ClassifierConfig] = [
            ClassifierConfig("iris", (8, 8), epochs=60, eps=(0.2,), radii=(0.0, 0.1, 0.2, 0.4),
                             robust_points=30, local_points=10),
            ClassifierConfig("digits", (8,), epochs=8, eps=(0.05,), radii=(0.0, 0.1, 0.3),
                             robust_points=20, local_points=5, pgd_steps=3, pair_method="sequential",
                             local_method="sequential"),
        ]
        cfg = ReproduceConfig(random=random, methods=methods, attack_steps=10, attack_restarts=1,
                              lower_samples=64, lower_steps=10, quick=True)
    else:
        classifiers = [
            ClassifierConfig("iris", (16, 16), epochs=200, eps=(0.1, 0.2, 0.3),
                             radii=tuple(np.round(np.linspace(0, 0.8, 9), 3)), local_points=20),
            ClassifierConfig("digits", (16, 16), epochs=30, eps=(0.02, 0.05, 0.1),
                             radii=tuple(np.round(np.linspace(0, 0.8, 9), 3)), robust_points=60,
                             local_points=10),
        ]
        cfg = ReproduceConfig(methods=methods, workers=min(2, os.cpu_count() or 1))
    if mnist is not None:
        classifiers.append(
            ClassifierConfig("mnist", (32,), epochs=3 if quick else 10, eps=(0.05,) if quick else (0.05, 0.1),
                             radii=(0.0, 0.25, 0.5, 1.0, 1.5, 2.0), batch_size=128, robust_points=50,
                             local_points=0)
        )
    return replace(cfg, classifiers=tuple(classifiers))


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """A classification data set split into train and test; `scale` says what one input unit means."""

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    scale: str = ""


def load_dataset(name: str, *, mnist: str | Path | None = None, seed: int = 0) -> Dataset:
    """Iris (standardised features) and 8x8 digits (pixels in [0, 1]) from scikit-learn, split 70/30
    stratified with `seed`; MNIST from a Keras-style .npz (x_train, y_train, x_test, y_test), pixels in [0, 1]."""
    if name == "mnist":
        if mnist is None:
            raise LipSDPError("the MNIST experiment needs the data: pass --mnist FILE.npz (Keras mnist.npz layout)")
        try:
            with np.load(mnist) as data:
                parts = [np.asarray(data[k]) for k in ("x_train", "y_train", "x_test", "y_test")]
        except (OSError, KeyError, ValueError) as exc:
            raise LipSDPError(
                f"could not read MNIST from {mnist}: {exc}; expected an .npz with arrays x_train, y_train, "
                "x_test, y_test (as Keras' mnist.npz)"
            ) from exc
        xtr, ytr, xte, yte = parts
        xtr = xtr.reshape(len(xtr), -1).astype(np.float64) / 255.0
        xte = xte.reshape(len(xte), -1).astype(np.float64) / 255.0
        rng = np.random.default_rng(seed)
        keep = rng.permutation(len(xtr))[:10000]
        return Dataset("mnist", xtr[keep], ytr[keep].astype(np.int64), xte[:2000], yte[:2000].astype(np.int64),
                       "pixels in [0, 1], 784 inputs (10000 training images)")
    try:
        from sklearn.datasets import load_digits, load_iris
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LipSDPError("the reproduce experiments need scikit-learn: pip install 'lipsdp[reproduce]'") from exc
    loaders = {"iris": load_iris, "digits": load_digits}
    if name not in loaders:
        raise LipSDPError(f"unknown data set '{name}'; choose iris, digits or mnist")
    x, y = loaders[name](return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    if name == "iris":
        mu, sd = xtr.mean(axis=0), xtr.std(axis=0)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
        scale = "features standardised with the training mean and std"
    else:
        xtr, xte = xtr / 16.0, xte / 16.0
        scale = "pixels in [0, 1], 64 inputs"
    return Dataset(name, xtr.astype(np.float64), ytr.astype(np.int64), xte.astype(np.float64),
                   yte.astype(np.int64), scale)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def lmi_size(net: Network) -> int:
    """Dimension of the LipSDP matrix inequality: inputs plus hidden neurons."""
    return net.sizes[0] + net.n_neurons


def random_network(n_in: int, hidden: Sequence[int], n_out: int, seed: int) -> Network:
    """ReLU network with i.i.d. N(0, 1/n_in) weights and zero biases (biases do not change L)."""
    rng = np.random.default_rng(seed)
    sizes = [n_in, *hidden, n_out]
    ws = [rng.standard_normal((sizes[k + 1], sizes[k])) / math.sqrt(sizes[k]) for k in range(len(sizes) - 1)]
    return Network.from_arrays(ws, "relu")


def _bound(net: Network, method: str, cfg: ReproduceConfig) -> tuple[float | None, float]:
    """(verified upper bound, seconds), or (None, 0) where an SDP method is skipped for size."""
    if method in SDP_METHODS and lmi_size(net) > cfg.sdp_limit:
        return None, 0.0
    res = estimate(net, method, seed=cfg.seed)
    return res.upper, res.seconds


def _lower(net: Network, samples: int, steps: int, seed: int, points: np.ndarray | None = None) -> float:
    """Largest Jacobian norm found (random search + ascent, and at `points` if given): a true lower bound."""
    from lipsdp.lower import jacobian_norms, lower_bound

    value = lower_bound(net, samples=samples, steps=steps, seed=seed).value
    if points is not None and len(points):
        value = max(value, float(np.max(jacobian_norms(net, points))))
    return value


def _say(progress: Progress | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)


# ----------------------------------------------------------------------------------------------
# experiment 1: random networks
# ----------------------------------------------------------------------------------------------
def random_networks(cfg: ReproduceConfig, progress: Progress | None = None) -> list[dict[str, Any]]:
    """One row per (sweep, network, method): verified upper bounds, the lower bound, seconds."""
    rc = cfg.random
    shapes = [("depth", d, rc.depth_width) for d in rc.depths] + [("width", rc.width_depth, w) for w in rc.widths]
    rows: list[dict[str, Any]] = []
    for sweep, depth, width in shapes:
        for seed in rc.seeds:
            net = random_network(rc.n_in, [width] * depth, rc.n_out, seed)
            base = {"sweep": sweep, "hidden_layers": depth, "width": width, "neurons": depth * width,
                    "seed": seed}
            for method in cfg.methods:
                upper, seconds = _bound(net, method, cfg)
                rows.append(dict(base, method=method, value=upper, seconds=seconds))
            start = time.perf_counter()
            low = _lower(net, rc.lower_samples, rc.lower_steps, seed)
            rows.append(dict(base, method="lower", value=low, seconds=time.perf_counter() - start))
        _say(progress, f"random networks: {sweep} sweep, {depth} x {width} done")
    return rows


def summarise_random(rows: list[dict[str, Any]], sweep: str) -> tuple[list[int], dict[str, list], dict[str, list]]:
    """x values, and per method the mean bound and mean seconds over seeds (None where skipped)."""
    key = "hidden_layers" if sweep == "depth" else "width"
    sel = [r for r in rows if r["sweep"] == sweep]
    xs = sorted({r[key] for r in sel})
    methods = list(dict.fromkeys(r["method"] for r in sel))
    bounds: dict[str, list] = {m: [] for m in methods}
    secs: dict[str, list] = {m: [] for m in methods}
    for m in methods:
        for x in xs:
            vals = [r for r in sel if r["method"] == m and r[key] == x]
            ok = [r for r in vals if r["value"] is not None]
            bounds[m].append(float(np.mean([r["value"] for r in ok])) if ok else None)
            secs[m].append(float(np.mean([r["seconds"] for r in ok])) if ok else None)
    return xs, bounds, secs


# ----------------------------------------------------------------------------------------------
# experiment 2: trained classifiers
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainedModel:
    """A trained classifier with its verified bounds (`bounds[method]`, None where skipped)."""

    dataset: str
    training: str
    eps: float
    model: Any = field(repr=False)
    net: Network = field(repr=False)
    test_accuracy: float = 0.0
    bounds: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0

    @property
    def label(self) -> str:
        return "standard" if self.training == "standard" else f"{self.training.upper()} eps={self.eps:g}"

    def row(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "training": self.training, "eps": self.eps,
                "test_accuracy": self.test_accuracy, "bounds": dict(self.bounds), "seconds": dict(self.seconds),
                "train_seconds": self.train_seconds, "network": self.net.describe()}


def trained_classifiers(
    cfg: ReproduceConfig, cc: ClassifierConfig, data: Dataset, progress: Progress | None = None
) -> list[TrainedModel]:
    """Train the standard model and one FGSM and one PGD model per eps; bound each."""
    from lipsdp.io import load_network
    from lipsdp.training import accuracy, train_classifier

    runs = [("standard", 0.0)] + [(a, e) for a in ("fgsm", "pgd") for e in cc.eps]
    out = []
    for training, eps in runs:
        start = time.perf_counter()
        model = train_classifier(
            data.x_train, data.y_train, cc.hidden, attack=None if training == "standard" else training, eps=eps,
            norm=cc.train_norm, epochs=cc.epochs, batch_size=cc.batch_size, lr=cc.lr, pgd_steps=cc.pgd_steps,
            seed=cfg.seed,
        )
        tm = TrainedModel(cc.dataset, training, eps, model, load_network(model),
                          accuracy(model, data.x_test, data.y_test), train_seconds=time.perf_counter() - start)
        methods = [m for m in cfg.methods if m != "lower"]
        for m in methods:
            tm.bounds[m], tm.seconds[m] = _bound(tm.net, m, cfg)
        start = time.perf_counter()
        tm.bounds["lower"] = _lower(tm.net, cfg.lower_samples, cfg.lower_steps, cfg.seed, data.x_test)
        tm.seconds["lower"] = time.perf_counter() - start
        out.append(tm)
        _say(progress, f"{cc.dataset}: {tm.label} trained, test accuracy {tm.test_accuracy:.3f}, "
             + ", ".join(f"{m} {v:.4g}" for m, v in tm.bounds.items() if v is not None))
    return out


# ----------------------------------------------------------------------------------------------
# experiment 3: certified robustness
# ----------------------------------------------------------------------------------------------
@dataclass
class Robustness:
    """Certified and attacked accuracy of one classifier on `n_points` test points at each radius."""

    dataset: str
    model: str
    radii: list[float]
    curves: dict[str, list[float]]
    n_points: int
    n_local_points: int
    global_bound: float
    global_method: str
    pair_bounds: dict[str, float]
    local_solves: int = 0
    seconds: float = 0.0
    local_failures: list[str] = field(default_factory=list)
    api: str = "lipsdp.certify (global, pair) and lipsdp.estimate(pair=, region=lipsdp.Ball) (local)"


def _sdp_or_sequential(method: str, net: Network, cfg: ReproduceConfig) -> str:
    return "sequential" if method in SDP_METHODS and lmi_size(net) > cfg.sdp_limit else method


def robustness(
    cfg: ReproduceConfig, cc: ClassifierConfig, tm: TrainedModel, data: Dataset, progress: Progress | None = None
) -> Robustness:
    """Certified accuracy against the l2 radius with global, pair and local bounds, and PGD accuracy.

    global: margin / (sqrt2 L) (`lipsdp.certify(bound='global')`). pair: min_j (f_y - f_j) / L_yj with L_yj
    the verified bound of the logit difference (`bound='pair'`). local: at each radius r, the pair bounds
    that do not already certify are recomputed on the ball B(x, r) (`estimate(pair=, region=Ball(x, r))`);
    the point counts if every f_y - f_j > min(L_yj, local L_yj) r. The local bounds are computed for the
    first `local_points` points only; the others keep their pair certificate, so the local curve is a valid
    (if pessimistic) certified accuracy on all points.
    """
    import lipsdp
    from lipsdp.training import attacked_accuracy

    start = time.perf_counter()
    net = tm.net
    n = min(cc.robust_points, len(data.y_test))
    x, y = data.x_test[:n], data.y_test[:n]
    radii = np.array([float(r) for r in cc.radii])
    global_method = _sdp_or_sequential("neuron", net, cfg)
    pair_method = _sdp_or_sequential(cc.pair_method, net, cfg)
    local_method = _sdp_or_sequential(cc.local_method, net, cfg)
    glob = lipsdp.certify(net, x, y, bound="global", method=global_method, seed=cfg.seed)
    pair = lipsdp.certify(net, x, y, bound="pair", method=pair_method, workers=cfg.workers, seed=cfg.seed)
    n_classes = net.sizes[-1]
    pair_l = np.full((n_classes, n_classes), np.inf)
    for (i, j), value in pair.bounds.items():
        pair_l[i, j] = pair_l[j, i] = value
    logits = net.forward(x)
    margins = logits[np.arange(n), y][:, None] - logits  # margins[p, j] = f_y - f_j
    correct = pair.correct
    local_ok = correct[:, None] & (pair.radii[:, None] >= radii[None, :])
    n_local = min(cc.local_points, n)
    solves = 0
    failures: list[str] = []
    for p in np.flatnonzero(correct[:n_local]):
        for k, r in enumerate(radii):
            if local_ok[p, k]:
                continue
            ok = True
            for j in range(n_classes):
                if j == y[p] or margins[p, j] > pair_l[y[p], j] * r:
                    continue
                solves += 1
                try:
                    lj = estimate(net, local_method, pair=(int(y[p]), j), region=lipsdp.Ball(x[p], r),
                                  seed=cfg.seed).upper
                except (LipSDPError, np.linalg.LinAlgError) as exc:  # no local bound: no local certificate
                    failures.append(f"point {p}, r={r:g}, pair ({y[p]}, {j}): {type(exc).__name__}: {exc}")
                    log.warning("local bound failed (%s); counted as not certified", failures[-1])
                    lj = math.inf
                if not margins[p, j] > min(lj, pair_l[y[p], j]) * r:
                    ok = False
                    break
            if not ok:
                break  # the ball only grows with r, so larger radii fail too
            local_ok[p, k] = True
    curves = {
        "clean": [float(np.mean(correct))] * len(radii),
        f"global ({global_method})": [float(v) for v in glob.certified_accuracy(radii)],
        f"pair ({pair_method})": [float(v) for v in pair.certified_accuracy(radii)],
    }
    if n_local:
        curves[f"local ({local_method}, {n_local} pts)"] = [float(v) for v in local_ok.mean(axis=0)]
    curves["pgd attack"] = [
        attacked_accuracy(tm.model, x, y, float(r), "l2", steps=cfg.attack_steps, restarts=cfg.attack_restarts,
                          seed=cfg.seed)
        for r in radii
    ]
    pairs = {f"{i}-{j}": float(v) for (i, j), v in sorted(pair.bounds.items())}
    res = Robustness(cc.dataset, tm.label, [float(r) for r in radii], curves, n, n_local,
                     float(glob.bounds["global"]), global_method, pairs, solves, time.perf_counter() - start,
                     failures)
    _say(progress, f"{cc.dataset}: robustness of {tm.label} done ({solves} local solves, {res.seconds:.1f}s)")
    return res


# ----------------------------------------------------------------------------------------------
# figures and report
# ----------------------------------------------------------------------------------------------
def _figure(path: Path, draw: Callable[[Any], Any], ncols: int = 1) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.0), squeeze=False)
    draw(axes[0] if ncols > 1 else axes[0][0])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class ReproduceResult:
    """What `run` produced: the report, the figures, and the raw numbers."""

    report: Path
    figures: list[Path]
    data: dict[str, Any]
    checks: list[tuple[str, bool]]


def _draw_figures(out: Path, data: dict[str, Any], models: dict[str, list[TrainedModel]],
                  robust: list[Robustness]) -> list[Path]:
    from lipsdp import plot

    figs: list[Path] = []
    rows = data["random"]
    if rows:
        xd, bd, _ = summarise_random(rows, "depth")
        xw, bw, _ = summarise_random(rows, "width")
        rc = data["config"]["random"]
        figs.append(_figure(out / "random_depth.png", lambda ax: plot.plot_bounds(
            ax, xd, bd, xlabel="hidden layers",
            title=f"Random ReLU nets, width {rc['depth_width']} (mean of {len(rc['seeds'])})")))
        figs.append(_figure(out / "random_width.png", lambda ax: plot.plot_bounds(
            ax, xw, bw, xlabel="hidden width",
            title=f"Random ReLU nets, {rc['width_depth']} hidden layers (mean of {len(rc['seeds'])})")))

        def draw_time(ax: Any) -> Any:
            sel = [r for r in rows if r["value"] is not None and r["seconds"] > 0]
            for m in dict.fromkeys(r["method"] for r in sel):
                pts = sorted((r["neurons"] + rc["n_in"], r["seconds"]) for r in sel if r["method"] == m)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", label=m, **{
                    k: v for k, v in plot.style(m).items() if k != "linestyle"})
            ax.set_xscale("log")
            ax.set_yscale("log")
            plot.plain_log_labels(ax.xaxis)
            ax.set_xlabel("LMI size (inputs + hidden neurons)")
            ax.set_ylabel("seconds")
            ax.set_title("Computation time, random networks")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
            return ax

        figs.append(_figure(out / "random_time.png", draw_time))
    for name, tms in models.items():
        def draw_trained(axes: Any, tms: list[TrainedModel] = tms, name: str = name) -> Any:
            std = tms[0]
            for ax, attack in zip(axes, ("fgsm", "pgd")):
                sel = [std] + [t for t in tms if t.training == attack]
                keys = [k for k in std.bounds if any(t.bounds.get(k) is not None for t in sel)]
                plot.plot_bounds_vs_eps(
                    ax, [t.eps for t in sel], {k: [t.bounds.get(k) for t in sel] for k in keys},
                    [t.test_accuracy for t in sel], xlabel=f"{attack.upper()} training eps ({std_norm(name, data)})",
                    title=f"{name}: {attack.upper()} adversarial training")
            return axes

        figs.append(_figure(out / f"trained_{name}.png", draw_trained, ncols=2))
    for rb in robust:
        slug = f"robust_{rb.dataset}_{rb.model.split(' ')[0].lower()}"
        figs.append(_figure(out / f"{slug}.png", lambda ax, rb=rb: plot.plot_certified_accuracy(
            ax, rb.radii, rb.curves, title=f"{rb.dataset}, {rb.model}: accuracy vs l2 radius")))
    return figs


def std_norm(dataset: str, data: dict[str, Any]) -> str:
    for c in data["config"]["classifiers"]:
        if c["dataset"] == dataset:
            return "l-inf" if c["train_norm"] == "linf" else "l2"
    return ""


def _checks(data: dict[str, Any], models: dict[str, list[TrainedModel]], robust: list[Robustness]) -> list:
    """The orderings every run must satisfy (soundness), and the paper's claims (which may fail honestly)."""
    tol = 1e-7
    checks: list[tuple[str, bool]] = []
    nets: dict[tuple, dict[str, float]] = {}
    for r in data["random"]:
        if r["value"] is not None:
            nets.setdefault((r["sweep"], r["hidden_layers"], r["width"], r["seed"]), {})[r["method"]] = r["value"]
    for tms in models.values():
        for t in tms:
            nets[(t.dataset, t.label)] = {k: v for k, v in t.bounds.items() if v is not None}
    chain = ("lower", "neuron", "layer", "naive")
    ok = all(
        b[lo] <= b[hi] * (1 + tol)
        for b in nets.values()
        for lo, hi in itertools.pairwise(chain)
        if lo in b and hi in b
    )
    checks.append((f"lower <= neuron <= layer <= naive on all {len(nets)} networks", ok))
    ok = all(b["lower"] <= min(v for k, v in b.items() if k != "lower") * (1 + tol) for b in nets.values())
    checks.append(("every verified upper bound >= the lower bound", ok))
    for rb in robust:
        pgd, clean = rb.curves["pgd attack"], rb.curves["clean"]
        cert = [v for k, v in rb.curves.items() if k not in ("pgd attack", "clean")]
        ok = all(c[i] <= pgd[i] + 1e-12 and pgd[i] <= clean[i] + 1e-12 for c in cert for i in range(len(pgd)))
        checks.append((f"{rb.dataset} {rb.model}: certified <= PGD <= clean accuracy at every radius", ok))
    return checks


def _claims(data: dict[str, Any], models: dict[str, list[TrainedModel]]) -> list[str]:
    """Plain statements comparing this run with the paper's qualitative claims."""
    lines = []
    rows = data["random"]
    if rows:
        xd, bd, _ = summarise_random(rows, "depth")
        if bd.get("neuron") and bd["neuron"][-1] is not None and bd.get("naive"):
            first = bd["naive"][0] / bd["neuron"][0]
            last = bd["naive"][-1] / bd["neuron"][-1]
            lines.append(
                f"Naive / LipSDP-Neuron grows with depth: {first:.2f}x at {xd[0]} hidden layer(s), "
                f"{last:.2f}x at {xd[-1]} (paper: the gap to the naive bound widens with depth)."
            )
        if bd.get("neuron") and bd.get("layer") and bd["layer"][-1] is not None:
            lines.append(
                f"LipSDP-Layer / LipSDP-Neuron at the deepest net: {bd['layer'][-1] / bd['neuron'][-1]:.2f}x "
                "(paper: Neuron is tighter than Layer at a higher cost)."
            )
        if bd.get("lower") and bd.get("neuron") and bd["neuron"][-1] is not None:
            lines.append(
                f"Neuron / lower bound: {bd['neuron'][0] / bd['lower'][0]:.2f}x at depth {xd[0]}, "
                f"{bd['neuron'][-1] / bd['lower'][-1]:.2f}x at depth {xd[-1]} (the lower bound is a sampled "
                "Jacobian norm, so part of this gap is the lower bound's, not LipSDP's)."
            )
    for name, tms in models.items():
        std = tms[0]
        key = "neuron" if std.bounds.get("neuron") is not None else "sequential"
        for attack in ("fgsm", "pgd"):
            sel = [t for t in tms if t.training == attack]
            if not sel or std.bounds.get(key) is None:
                continue
            vals = [t.bounds[key] for t in sel]
            lower_all = all(v < std.bounds[key] for v in vals)
            mono = all(b <= a for a, b in itertools.pairwise(vals))
            lines.append(
                f"{name}, {attack.upper()}: {key} bound {std.bounds[key]:.4g} (standard) -> "
                + ", ".join(f"{v:.4g} (eps={t.eps:g})" for t, v in zip(sel, vals))
                + f"; {'below' if lower_all else 'NOT always below'} the standard model"
                + f"{', decreasing in eps' if mono else ', not monotone in eps'}; test accuracy "
                + f"{std.test_accuracy:.3f} -> " + ", ".join(f"{t.test_accuracy:.3f}" for t in sel) + "."
            )
    return lines


def write_report(out: Path, data: dict[str, Any], models: dict[str, list[TrainedModel]],
                 robust: list[Robustness], figs: list[Path], checks: list[tuple[str, bool]]) -> Path:
    """REPORT.md: tables, figure links, soundness checks and the comparison with the paper's claims."""
    cfg = data["config"]
    md = [
        "# LipSDP reproduction report",
        "",
        (f"Generated by `lipsdp reproduce{' --quick' if cfg['quick'] else ''}` in {data['seconds']:.0f} s "
        f"(lipsdp {data['versions']['lipsdp']}, torch {data['versions']['torch']}, Python "
        f"{data['versions']['python']}, {data['versions']['machine']}). Every upper bound below is verified "
        "(floating-point Cholesky certificate); lower bounds are exact Jacobian norms at inputs found by search; "
        "PGD accuracies are what an attack leaves (an empirical ceiling, not a guarantee). Seeded: a rerun on "
        "the same machine gives the same numbers (timings aside)."),
        "",
        (f"Methods: {', '.join(cfg['methods'])}. LMIs larger than {cfg['sdp_limit']} (inputs + hidden neurons) "
        "skip the SDP methods (shown as –)."),
        "",
        "## Checks",
        "",
    ]
    md += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    md += ["", "## Comparison with the paper's claims", ""] + [f"- {c}" for c in _claims(data, models)]
    rows = data["random"]
    if rows:
        rc = cfg["random"]
        md += ["", "## 1. Random networks", "",
               (f"ReLU networks with i.i.d. N(0, 1/n_in) weights, {rc['n_in']} inputs, {rc['n_out']} outputs; "
               f"mean over seeds {list(rc['seeds'])}. Bounds, then mean seconds."), ""]
        for sweep, label in (("depth", "hidden layers"), ("width", "width")):
            xs, b, s = summarise_random(rows, sweep)
            ms = list(b)
            title = (f"width {rc['depth_width']}, varying depth" if sweep == "depth"
                     else f"{rc['width_depth']} hidden layers, varying width")
            md += [f"**{title}**", "",
                   _table([label, *ms, "neuron/lower"],
                          [[x, *[b[m][i] for m in ms],
                            (b["neuron"][i] / b["lower"][i]) if b.get("neuron") and b["neuron"][i] else None]
                           for i, x in enumerate(xs)]), "",
                   _table([label, *[f"{m} s" for m in ms]], [[x, *[s[m][i] for m in ms]] for i, x in enumerate(xs)]),
                   ""]
        md += [f"![{p.stem}](figures/{p.name})" for p in figs if p.stem.startswith("random")]
    for name, tms in models.items():
        cc = next(c for c in cfg["classifiers"] if c["dataset"] == name)
        keys = [k for k in tms[0].bounds if any(t.bounds.get(k) is not None for t in tms)]
        md += ["", f"## 2. Trained classifier: {name}", "",
               (f"{tms[0].net.describe()}; {data['datasets'][name]}; {cc['epochs']} epochs of Adam, seed "
               f"{cfg['seed']}; adversarial training in {std_norm(name, data)} (FGSM: half clean, half "
               "adversarial; PGD: adversarial only)."), "",
               _table(["training", "eps", "test acc", *keys, "neuron/naive"],
                      [[t.training, t.eps, t.test_accuracy, *[t.bounds.get(k) for k in keys],
                        (t.bounds["neuron"] / t.bounds["naive"]) if t.bounds.get("neuron") else None] for t in tms]),
               "", f"![trained_{name}](figures/trained_{name}.png)"]
    if robust:
        md += ["", "## 3. Certified robustness (l2)", "",
               ("Certified accuracy: fraction of test points classified correctly whose certified radius exceeds "
               "r. *global*: margin / (sqrt2 L). *pair*: min over j of (f_y - f_j) / L_yj. *local*: pair bounds "
               "recomputed on the ball B(x, r) with tightened ReLU slopes (first points only; the rest keep their "
               "pair certificate). *pgd attack*: accuracy left by l2 PGD (margin and CE losses, restarts)."), ""]
        for rb in robust:
            md += [(f"**{rb.dataset}, {rb.model}** ({rb.n_points} test points; L = {rb.global_bound:.4g} by "
                   f"{rb.global_method}; {rb.local_solves} local SDPs; {rb.seconds:.0f} s; via {rb.api})"), "",
                   *([(f"{len(rb.local_failures)} local bound(s) failed and count as not certified, e.g. "
                      f"{rb.local_failures[0]}"), ""] if rb.local_failures else []),
                   _table(["r", *rb.curves], [[r, *[c[i] for c in rb.curves.values()]] for i, r in
                                               enumerate(rb.radii)]), "",
                   f"![{rb.dataset}](figures/robust_{rb.dataset}_{rb.model.split(' ')[0].lower()}.png)", ""]
    md += ["", "Raw numbers: `results.json`.", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(md))
    return path


# ----------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------
def run(
    out: str | Path,
    *,
    quick: bool = False,
    mnist: str | Path | None = None,
    config: ReproduceConfig | None = None,
    figures_to: str | Path | None = None,
    progress: Progress | None = None,
) -> ReproduceResult:
    """Run the three experiments, write `out`/REPORT.md, results.json and figures/*.png; copy the figures to
    `figures_to` if given. `config` overrides the preset chosen by `quick` / `mnist`."""
    cfg = config or default_config(quick, mnist)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return _run(Path(out), cfg, mnist, figures_to, progress)
    # one BLAS thread: the matrices are small, so threads only add overhead (badly so on a busy machine),
    # and single-threaded reductions keep the numbers reproducible
    with threadpool_limits(limits=1):
        return _run(Path(out), cfg, mnist, figures_to, progress)


def _run(
    out: Path, cfg: ReproduceConfig, mnist: str | Path | None, figures_to: str | Path | None,
    progress: Progress | None,
) -> ReproduceResult:
    import torch

    from lipsdp import __version__

    start = time.perf_counter()
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "config": asdict(cfg),
        "versions": {"lipsdp": __version__, "torch": torch.__version__, "python": platform.python_version(),
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads available"},
        "datasets": {},
    }
    _say(progress, f"methods: {', '.join(cfg.methods)}")
    data["random"] = random_networks(cfg, progress)
    models: dict[str, list[TrainedModel]] = {}
    robust: list[Robustness] = []
    for cc in cfg.classifiers:
        ds = load_dataset(cc.dataset, mnist=mnist, seed=cfg.seed)
        data["datasets"][cc.dataset] = ds.scale
        tms = trained_classifiers(cfg, cc, ds, progress)
        models[cc.dataset] = tms
        strongest = [t for t in tms if t.training == "pgd"][-1:]
        for tm in [tms[0], *strongest]:
            robust.append(robustness(cfg, cc, tm, ds, progress))
    data["trained"] = [t.row() for tms in models.values() for t in tms]
    data["robustness"] = [asdict(r) for r in robust]
    data["seconds"] = time.perf_counter() - start
    figs = _draw_figures(fig_dir, data, models, robust)
    checks = _checks(data, models, robust)
    data["checks"] = [{"check": c, "passed": ok} for c, ok in checks]
    (out / "results.json").write_text(json.dumps(data, indent=1, default=float))
    report = write_report(out, data, models, robust, figs, checks)
    if figures_to is not None:
        dest = Path(figures_to)
        dest.mkdir(parents=True, exist_ok=True)
        for p in figs:
            shutil.copy2(p, dest / p.name)
    _say(progress, f"report written to {report} ({data['seconds']:.0f} s)")
    return ReproduceResult(report, figs, data, checks)
