"""`lipsdp.descent.LogDescent`: L-BFGS on log t keeps the best point, respects its deadline and walls, and
moves only within the channel subspace when asked. Truths: closed-form minimisers of smooth test functions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lipsdp.descent import LogDescent


def _quadratic(target: np.ndarray, calls: list):
    """rho(t) = 1 + |t - target|^2, minimised at t = target (value 1)."""

    def evaluate(t: np.ndarray, start):
        calls.append(t.copy())
        return 1.0 + float(np.sum((t - target) ** 2)), 2.0 * (t - target), np.ones(1)

    return evaluate


@pytest.mark.parametrize("logarithmic", [True, False])
def test_reaches_the_minimiser_and_keeps_the_best_point(logarithmic):
    target = np.array([0.5, 2.0, 3.0])
    calls: list = []
    evaluate = _quadratic(target, calls)
    t0 = np.ones(3)
    descent = LogDescent(evaluate, t0, evaluate(t0, None), math.inf, logarithmic=logarithmic)
    descent.run()
    np.testing.assert_allclose(descent.best_t, target, rtol=1e-5)
    assert descent.best_rho == pytest.approx(1.0, abs=1e-9)
    assert descent.best_rho == min(1.0 + float(np.sum((t - target) ** 2)) for t in calls)
    assert descent.evaluations == len(calls)


def test_groups_move_one_variable_per_group():
    """With groups (0, 0, 1) the first two multipliers keep their ratio; the best common factor for a
    target (1, 3) on them is 2, the third reaches its target."""
    target = np.array([1.0, 3.0, 5.0])
    evaluate = _quadratic(target, [])
    t0 = np.ones(3)
    descent = LogDescent(evaluate, t0, evaluate(t0, None), math.inf)
    descent.run(groups=(np.array([0, 0, 1]), 2))
    np.testing.assert_allclose(descent.best_t, [2.0, 2.0, 5.0], rtol=1e-5)


def test_a_passed_deadline_leaves_the_start():
    calls: list = []
    evaluate = _quadratic(np.full(2, 4.0), calls)
    t0 = np.ones(2)
    first = evaluate(t0, None)
    descent = LogDescent(evaluate, t0, first, deadline=-math.inf)
    descent.run()
    assert descent.best_t is t0 and descent.best_rho == first[0] and len(calls) == 1


def test_a_wall_is_never_crossed():
    """Outside t < 2 there is no value (None): the best point stays inside, at the wall's side."""
    inner = _quadratic(np.array([5.0]), [])

    def evaluate(t, start):
        return None if t[0] >= 2.0 else inner(t, start)

    t0 = np.ones(1)
    descent = LogDescent(evaluate, t0, evaluate(t0, None), math.inf)
    descent.run(iterations=200)
    assert 1.5 < descent.best_t[0] < 2.0
