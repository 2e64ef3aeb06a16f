"""Matplotlib figures of Lipschitz bounds, timings and certified accuracy.

Every function draws on the `Axes` it is given and returns it; none calls `show()` or picks a backend,
so they work in notebooks, scripts and the headless `lipsdp reproduce` (which uses Agg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# one fixed style per method, so that every figure reads the same way
_STYLE: dict[str, dict[str, Any]] = {
    "naive": {"color": "tab:red", "marker": "v"},
    "sequential": {"color": "tab:orange", "marker": "D"},
    "anytime": {"color": "tab:olive", "marker": "P"},
    "layer": {"color": "tab:blue", "marker": "s"},
    "neuron": {"color": "tab:green", "marker": "o"},
    "lower": {"color": "black", "marker": "x", "linestyle": "--"},
    "global": {"color": "tab:red", "marker": "v"},
    "pair": {"color": "tab:blue", "marker": "s"},
    "local": {"color": "tab:green", "marker": "o"},
    "pgd": {"color": "black", "marker": "x", "linestyle": "--"},
    "clean": {"color": "gray", "linestyle": ":"},
}


def style(name: str) -> dict[str, Any]:
    """Line style of a series: fixed for known methods, matplotlib's cycle otherwise."""
    key = name.split(" ")[0].lower()
    return dict(_STYLE.get(key, {"marker": "."}))


def plain_log_labels(axis: Any) -> None:
    """Label a log axis with plain numbers (10, 20, 50) instead of powers, minor ticks too when the range is
    under two decades, so that a narrow range still shows readable values."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(fmt)
    lo, hi = axis.get_view_interval()
    if lo > 0 and hi / lo < 100:
        axis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
        axis.set_minor_formatter(fmt)
    else:
        axis.set_minor_formatter(NullFormatter())


def plot_series(
    ax: Any,
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
) -> Any:
    """One line per entry of `series` against `x`; missing values (None / NaN) leave gaps."""
    x = np.asarray(x, dtype=float)
    for name, values in series.items():
        y = np.array([np.nan if v is None else float(v) for v in values])
        if np.all(np.isnan(y)):
            continue
        ax.plot(x, y, label=name, **style(name))
    if logx:
        ax.set_xscale("log")
        plain_log_labels(ax.xaxis)
    if logy:
        ax.set_yscale("log")
        plain_log_labels(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_bounds(
    ax: Any,
    x: Sequence[float],
    bounds: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str,
    title: str | None = None,
) -> Any:
    """Lipschitz bounds of several methods (and the lower bound) against a size parameter, log scale."""
    return plot_series(ax, x, bounds, xlabel=xlabel, ylabel="l2 Lipschitz bound", title=title, logy=True)


def plot_times(
    ax: Any,
    sizes: Sequence[float],
    seconds: Mapping[str, Sequence[float | None]],
    *,
    xlabel: str = "hidden neurons",
    title: str | None = None,
) -> Any:
    """Computation time of each method against network size, log-log."""
    return plot_series(ax, sizes, seconds, xlabel=xlabel, ylabel="seconds", title=title, logx=True, logy=True)


def plot_bounds_vs_eps(
    ax: Any,
    eps: Sequence[float],
    bounds: Mapping[str, Sequence[float | None]],
    accuracy: Sequence[float] | None = None,
    *,
    xlabel: str = "training eps",
    title: str | None = None,
) -> Any:
    """Lipschitz bounds of adversarially trained models against the training eps (log y), with the test
    accuracy on a twin axis if given. Returns the main Axes."""
    plot_bounds(ax, eps, bounds, xlabel=xlabel, title=title)
    if accuracy is not None:
        twin = ax.twinx()
        twin.plot(eps, accuracy, color="tab:purple", linestyle=":", marker="*", label="test accuracy")
        twin.set_ylabel("test accuracy", color="tab:purple")
        twin.set_ylim(0.0, 1.05)
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(handles + h2, labels + l2, fontsize="small")
    return ax


def plot_certified_accuracy(
    ax: Any,
    radii: Sequence[float],
    curves: Mapping[str, Sequence[float | None]],
    *,
    title: str | None = None,
    xlabel: str = "l2 radius",
) -> Any:
    """Certified accuracy (and the accuracy an attack leaves) against the l2 radius."""
    plot_series(ax, radii, curves, xlabel=xlabel, ylabel="accuracy", title=title)
    ax.set_ylim(-0.02, 1.02)
    return ax
