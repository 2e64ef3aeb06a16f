"""Shared fixtures and independent reference computations for the test suite.

The helpers here compute *exact* Lipschitz constants of small piecewise-linear networks by enumerating
their linear regions (1-D input: exact breakpoints; 2-D input: exact polygon subdivision). They share no
code with lipsdp's bounding methods, so they serve as ground truth: every verified upper bound must lie
above them and every lower bound below them.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from lipsdp import Network

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# The numbers published in the README of the original LipSDP code (arobey1/LipSDP) for random_weights.mat.
ORIGINAL_LAYER = 39.839
ORIGINAL_NEURON = 36.482
ORIGINAL_NEURON_SPLIT2 = 37.668


def he_network(sizes: list[int], seed: int, activation="relu", bias_scale: float = 0.0) -> Network:
    """Seeded network with He-initialised weights N(0, 2 / fan_in) and optional N(0, bias_scale^2) biases."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0.0, np.sqrt(2.0 / a), size=(b, a)) for a, b in pairwise(sizes)]
    biases = [rng.normal(0.0, bias_scale, size=b) for b in sizes[1:]] if bias_scale else None
    return Network.from_arrays(weights, activation, biases)


def _slopes(net: Network, k: int, z: np.ndarray) -> np.ndarray:
    """Derivative of hidden activation k at pre-activations z (piecewise-linear activations only)."""
    act = net.activations[k]
    passing = getattr(act, "identity", None)  # a layer with pass-through neurons (lipsdp.graph)
    if passing is not None:
        s = _slopes_of(act.base, z)
        s[..., list(passing)] = 1.0
        return s
    return _slopes_of(act, z)


def _slopes_of(act, z: np.ndarray) -> np.ndarray:
    if act.name == "relu":
        return (z > 0).astype(float)
    if act.name == "leaky_relu":
        return np.where(z > 0, 1.0, act.param)
    if act.name == "identity":
        return np.ones_like(z)
    if act.name == "abs":
        return np.sign(z)
    raise ValueError(f"exact enumeration needs piecewise-linear activations, got {act.name}")


def exact_lipschitz_1d(net: Network) -> float:
    """Exact l2 Lipschitz constant of a piecewise-linear net with scalar input.

    Tracks the intervals on which each layer's input is affine in x, splitting them at every zero of every
    pre-activation; the constant is the largest norm of the final slope vector over all intervals.
    """
    assert net.sizes[0] == 1
    # Each piece: (lo, hi, A, c) with layer input h = A * x + c on [lo, hi]; A, c are vectors.
    pieces = [(-np.inf, np.inf, np.ones(1), np.zeros(1))]
    for k in range(net.depth):
        w, b = net.weights[k], net.biases[k]
        new = []
        for lo, hi, a, c in pieces:
            za, zc = w @ a, w @ c + b
            with np.errstate(divide="ignore", invalid="ignore"):
                roots = -zc / za
            cuts = np.unique(roots[np.isfinite(roots) & (roots > lo) & (roots < hi)])
            edges = np.concatenate([[lo], cuts, [hi]])
            for left, right in pairwise(edges):
                if np.isinf(left) and np.isinf(right):
                    mid = 0.0
                elif np.isinf(left):
                    mid = right - 1.0
                elif np.isinf(right):
                    mid = left + 1.0
                else:
                    mid = 0.5 * (left + right)
                s = _slopes(net, k, za * mid + zc)
                new.append((left, right, s * za, s * zc))
        pieces = new
    return max(float(np.linalg.norm(net.weights[-1] @ a)) for _, _, a, _ in pieces)


def _clip(poly: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """The part of a convex polygon (vertices in order) where normal . x + offset >= 0."""
    out = []
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        fp, fq = normal @ p + offset, normal @ q + offset
        if fp >= 0:
            out.append(p)
        if (fp >= 0) != (fq >= 0):
            out.append(p + fp / (fp - fq) * (q - p))
    return np.array(out) if out else np.zeros((0, 2))


def _area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def exact_lipschitz_2d(net: Network, box: float = 50.0) -> float:
    """Exact l2 Lipschitz constant of a piecewise-linear net with 2-D input, over [-box, box]^2.

    Splits the box into the network's linear regions (convex polygons, cut by every neuron's zero line in
    turn) and returns the largest Jacobian norm over regions. All regions of a small net with moderate
    biases meet a box this large, so this is the global constant.
    """
    assert net.sizes[0] == 2
    square = np.array([[-box, -box], [box, -box], [box, box], [-box, box]], dtype=float)
    pieces = [(square, np.eye(2), np.zeros(2))]  # (polygon, A, c): layer input h = A x + c
    min_area = 1e-12 * box * box
    for k in range(net.depth):
        w, b = net.weights[k], net.biases[k]
        new = []
        for poly, a, c in pieces:
            za, zc = w @ a, w @ c + b
            parts = [poly]
            for i in range(w.shape[0]):
                split = []
                for part in parts:
                    for sign in (1.0, -1.0):
                        sub = _clip(part, sign * za[i], sign * zc[i])
                        if _area(sub) > min_area:
                            split.append(sub)
                parts = split
            for part in parts:
                centre = part.mean(axis=0)
                s = _slopes(net, k, za @ centre + zc)
                new.append((part, s[:, None] * za, s * zc))
        pieces = new
    return max(float(np.linalg.norm(net.weights[-1] @ a, 2)) for _, a, _ in pieces)


@pytest.fixture(scope="session")
def original_net() -> Network:
    """The [2, 10, 30, 20, 2] ReLU net of the original LipSDP code."""
    from lipsdp.io import load_network

    return load_network(EXAMPLES / "relu_2-10-30-20-2.npz")


@pytest.fixture(scope="session")
def original_neuron(original_net):
    """LipSDP-Neuron on the original net with the default solver (computed once: it takes seconds)."""
    import lipsdp

    return lipsdp.estimate(original_net, "neuron")
