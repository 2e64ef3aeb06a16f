"""Run several bounding tiers on one model and collect a comparison (bound, gap to the lower bound,
time, peak memory). A tier that refuses the model or fails (a `LipSDPError`: too large for it, a solver
failure) gives a row with its error instead of stopping the others; an interrupt still stops them all."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass, replace
from typing import Any

from lipsdp.api import Result, estimate
from lipsdp.errors import LipSDPError
from lipsdp.io import load_network
from lipsdp.lower import lower_bound

DEFAULT_TIERS = ("naive", "sequential", "anytime", "layer", "neuron")


@dataclass(frozen=True)
class Comparison:
    """One tier's verified result (None when it failed: then `error` says why) and the peak memory
    (bytes, numpy/Python allocations) and seconds it used."""

    method: str
    result: Result | None
    peak_bytes: int
    seconds: float
    error: str | None = None


def compare(
    model: Any,
    methods: tuple[str, ...] = DEFAULT_TIERS,
    *,
    budget: float = 30.0,
    seed: int = 0,
    lower_samples: int = 512,
    lower_steps: int = 100,
    on_done=None,
    **options: Any,
) -> tuple[list[Comparison], float]:
    """Bound `model` with each method; returns the rows (one per method, in order; a failed method's row
    carries its error) and the lower bound they share."""
    net = load_network(model, **{k: options.pop(k) for k in ("input_shape", "activation") if k in options})
    lower = lower_bound(net, samples=lower_samples, steps=lower_steps, seed=seed).value
    rows = []
    for method in methods:
        tracemalloc.start()
        start = time.perf_counter()
        try:
            res = estimate(net, method, seed=seed, budget=budget, **options)
            row = Comparison(method, replace(res, lower=lower), tracemalloc.get_traced_memory()[1], res.seconds)
        except LipSDPError as exc:
            row = Comparison(method, None, tracemalloc.get_traced_memory()[1], time.perf_counter() - start, str(exc))
        finally:
            tracemalloc.stop()
        rows.append(row)
        if on_done:
            on_done(row)
    return rows, lower


def plot_comparison(rows: list[Comparison], lower: float, ax=None):
    """Bar chart of the verified bounds per method (failed methods left out) with the lower bound as a line;
    returns the Axes."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.result is not None]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    names = [r.result.method for r in rows]
    values = [r.result.upper for r in rows]
    bars = ax.bar(names, values, color="tab:blue", alpha=0.8, label="verified upper bound")
    for bar, r in zip(bars, rows):
        ax.annotate(
            f"{r.result.seconds:.2g}s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.axhline(lower, color="tab:red", linestyle="--", label=f"lower bound {lower:.4g}")
    ax.set_ylabel("Lipschitz constant (l2)")
    ax.set_xlabel("method")
    ax.set_title(rows[0].result.network if rows else "")
    ax.legend(loc="best", fontsize=8)
    return ax
