"""L-BFGS on the multipliers' logarithms within a deadline, keeping the best point seen.

Shared by the first-order LipSDP descents that get rho*(T) and its gradient from a Schur recursion with
Lanczos (`lipsdp.eliminate`, `lipsdp.reduced`): rho* is only piecewise smooth (its top eigenvalue may be
multiple), so this is a heuristic that steers multipliers, never a proof. Soundness does not depend on it:
every T it returns is certified like any other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

OPTIONS = {"ftol": 1e-12, "gtol": 1e-14, "maxcor": 40}  # run until the budget ends or no step gains

# (rho*(T), d rho*/dt, the top eigenvector for the next call's Lanczos start), or None outside the domain
Evaluation = tuple[float, np.ndarray, np.ndarray] | None


class _Stop(Exception):
    """The deadline of a descent has passed."""


class LogDescent:
    """Minimise rho*(T) (or its log, with `logarithmic`) over s = log t by L-BFGS-B from `t0` with its first
    evaluation `first`, until converged or past `deadline` (time.perf_counter()). A trial outside the domain
    counts as a value above the best one with a zero gradient, a wall the line search backs away from."""

    def __init__(self, evaluate: Callable[[np.ndarray, np.ndarray | None], Evaluation], t0: np.ndarray,
                 first: tuple[float, np.ndarray, np.ndarray], deadline: float,
                 logarithmic: bool = True) -> None:
        self.evaluate, self.deadline, self.logarithmic = evaluate, deadline, logarithmic
        self.best_rho, self.best_t, self.start = first[0], t0, first[2]
        self.evaluations = 1

    def _value(self, s: np.ndarray, end: float) -> tuple[float, np.ndarray]:
        if time.perf_counter() > min(end, self.deadline):
            raise _Stop
        t = np.exp(s)
        out = self.evaluate(t, self.start)
        self.evaluations += 1
        wall = math.log(self.best_rho) + 1.0 if self.logarithmic else 10.0 * self.best_rho
        if out is None or not out[0] > 0.0:
            return wall, np.zeros_like(s)
        rho, grad, top = out
        if rho < self.best_rho:
            self.best_rho, self.best_t, self.start = rho, t, top
        if self.logarithmic:
            return math.log(rho), t * grad / rho
        return rho, t * grad

    def run(self, iterations: int | None = None, groups: tuple[np.ndarray, int] | None = None,
            end: float = math.inf, options: dict | None = None) -> None:
        """Descend from the best point so far, at most `iterations` L-BFGS iterations (None: no limit) and
        not past `end`. With `groups` = (group of each multiplier, number of groups), only one variable per
        group moves: s = s0 + x[group] (a subspace of the multipliers, e.g. one per convolution channel).
        `options`: scipy's L-BFGS-B options instead of OPTIONS (`iterations` still sets maxiter)."""
        if iterations == 0:
            return
        from scipy.optimize import minimize

        s0 = np.log(self.best_t)
        if groups is None:
            fun, x0 = (lambda s: self._value(s, end)), s0
        else:
            index, n_groups = groups

            def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
                value, grad = self._value(s0 + x[index], end)
                return value, np.bincount(index, weights=grad, minlength=n_groups)

            x0 = np.zeros(n_groups)
        options = {**(OPTIONS if options is None else options), "maxiter": iterations or 10**6}
        try:
            minimize(fun, x0, jac=True, method="L-BFGS-B", options=options)
        except _Stop:
            pass
