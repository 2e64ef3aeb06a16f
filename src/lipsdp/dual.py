"""A proven *lower* bound on the LipSDP optimum, from any dual point: how far a bound can be from the best
bound LipSDP could give.

Weak duality, written for this LMI. F(rho, T) = rho E_0 + sum_i t_i M_i - C with M_i = U_i G_i U_i'
(one rank-2 term per neuron, see `lmi`), C = W_l'W_l on the last block, E_0 = I on the input block. For
any X >= 0 with <M_i, X> <= 0 for every neuron i, and any feasible (rho, T) (F >= 0, T >= 0):

    0 <= <F, X> = rho tr(X_00) + sum_i t_i <M_i, X> - <C, X> <= rho tr(X_00) - <C, X>,

so every feasible rho, the optimum included, is >= <C, X> / tr(X_00). (LipSDP-Layer ties the multipliers
of a layer, so there only the sum of <M_i, X> over each layer must be <= 0.) With X = V V' this reads

    <M_i, X> = 2 a b |p_i|^2 - 2 (a + b) p_i . q_i + 2 |q_i|^2,   p_i = w_i' V_{k-1},  q_i = row i of V_k,
    <C, X> = |W_l V_l|_F^2,   tr(X_00) = |V_0|_F^2,

and X is PSD by construction. An interior-point primal iterate is only approximately feasible, so we
repair it layer by layer: a neuron with <M_i, X> > 0 has its row q_i moved towards ((a + b) / 2) p_i,
where the value is -(b - a)^2 |p_i|^2 / 2 < 0 (the midpoint slope satisfies the sector condition
strictly); when rounding hides that margin (p_i about 0) and a b = 0, q_i = 0 makes the value exactly 0. Every inequality is checked with a rigorous bound on the floating-point error: a computed
product of a row w and V is within g_m |w| |V| of the exact one (Higham, eq. 3.13; g_m = m u / (1 - m u)),
and each dot product of length r within g_r times the product of the norms. Returns None when the
repair fails (e.g. exactly linear neurons, a = b, whose constraint can only hold with equality).
"""

from __future__ import annotations

import math

import numpy as np

from lipsdp.network import Network

UNIT_ROUNDOFF = 2.0**-53


def _gamma(k: int) -> float:
    return k * UNIT_ROUNDOFF / (1.0 - k * UNIT_ROUNDOFF)


def factor(x_mat: np.ndarray) -> np.ndarray | None:
    """V with V V' close to the (approximately PSD) matrix x_mat; None if it is not finite."""
    x = 0.5 * (x_mat + x_mat.T)
    if not np.all(np.isfinite(x)):
        return None
    try:
        return np.linalg.cholesky(x)
    except np.linalg.LinAlgError:
        lam, vec = np.linalg.eigh(x)
        return vec * np.sqrt(np.clip(lam, 0.0, None))[None, :]


def _products(w: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P = fl(W V) and, per row, a bound on |P_exact - P|_2 (with room for the bound's own rounding)."""
    p = w @ v
    err = _gamma(w.shape[1] + 2) * (np.abs(w) @ np.abs(v))
    return p, 1.01 * np.sqrt(np.einsum("ij,ij->i", err, err)) * (1.0 + 1e-10)


def _error_bound(pn, qn, p_err, a, b, r: int):
    """Bound on |exact <M_i, V V'> - computed value| given the norms of p_i and q_i (any q_i of norm <= qn)."""
    # rounding of the three dot products (norms computed in floating point: factor 2 covers them)
    rounding = 2.0 * _gamma(r + 8) * (np.abs(2.0 * a * b) * pn**2 + 2.0 * np.abs(a + b) * pn * qn + 2.0 * qn**2)
    # p is only within p_err of the exact product
    shift = np.abs(2.0 * a * b) * (2.0 * pn * p_err + p_err**2) + 2.0 * np.abs(a + b) * p_err * qn
    return (rounding + shift) * (1.0 + 1e-6)


def _constraint_values(p, q, a, b):
    """The computed <M_i, V V'> for each neuron, and the norms of p_i and q_i."""
    pn = np.sqrt(np.einsum("ij,ij->i", p, p))
    qn = np.sqrt(np.einsum("ij,ij->i", q, q))
    value = 2.0 * a * b * pn**2 - 2.0 * (a + b) * np.einsum("ij,ij->i", p, q) + 2.0 * qn**2
    return value, pn, qn


def _repair(p, p_err, q, a, b, tied: bool) -> np.ndarray | None:
    """Move rows of q towards the midpoint-slope image m p until every neuron's constraint (every layer's
    sum, when tied) provably holds. Returns the new q, or None."""
    r = p.shape[1]
    m = 0.5 * (a + b)
    value, pn, qn = _constraint_values(p, q, a, b)
    err = _error_bound(pn, qn, p_err, a, b, r)
    if tied:
        groups = [np.arange(len(a))] if np.sum(value + err) > 0 else []
    else:
        groups = [np.array([i]) for i in np.flatnonzero(value + err > 0)]
    q = q.copy()
    for idx in groups:
        d = m[idx, None] * p[idx] - q[idx]
        # value(s) = c0 + c1 s + c2 s^2 along q + s d; the error bound holds for every s in [0, 1]
        c0 = float(np.sum(value[idx]))
        c1 = float(np.sum(-2.0 * (a[idx] + b[idx]) * np.einsum("ij,ij->i", p[idx], d) + 4.0 * np.einsum("ij,ij->i", q[idx], d)))
        c2 = float(np.sum(2.0 * np.einsum("ij,ij->i", d, d)))
        qn_max = np.maximum(qn[idx], np.abs(m[idx]) * pn[idx])
        margin = 2.0 * float(np.sum(_error_bound(pn[idx], qn_max, p_err[idx], a[idx], b[idx], r)))
        s = _smallest_root(c0 + margin, c1, c2)
        if s is None:
            if np.any(a[idx] * b[idx] != 0):
                return None
            # a b = 0 (relu, tanh, sigmoid, elu, softplus): q_i = 0 makes the value exactly 0
            q[idx] = 0.0
            continue
        q[idx] = q[idx] + s * d
    if groups:
        value, pn, qn = _constraint_values(p, q, a, b)
        err = _error_bound(pn, qn, p_err, a, b, r)
        if (np.sum(value + err) > 0) if tied else np.any(value + err > 0):
            return None
    return q


def _smallest_root(c0: float, c1: float, c2: float) -> float | None:
    """Smallest s in [0, 1] with c0 + c1 s + c2 s^2 <= 0 (slightly enlarged), None if there is none."""
    if c0 <= 0:
        return 0.0
    end = c0 + c1 + c2
    if end > 0:
        return None
    if c2 <= 0:
        s = c0 / (c0 - end)
    else:
        disc = c1 * c1 - 4.0 * c2 * c0
        if disc < 0:
            return None
        s = (-c1 - math.sqrt(disc)) / (2.0 * c2)
    return min(1.0, max(0.0, s) * (1.0 + 1e-6) + 1e-12)


def lower_bound_rho(net: Network, v: np.ndarray, tied: bool = False) -> float | None:
    """A proven lower bound on the optimal rho of LipSDP-Neuron (LipSDP-Layer when `tied`) for `net`,
    from X = V V', V with n rows (n = sum of all widths but the output), e.g. `factor` of an approximate
    dual matrix. None when no bound can be proved."""
    if net.depth == 0 or any(np.any(a == b) for a, b in zip(net.alphas, net.betas)):
        return None
    if v is None or not np.all(np.isfinite(v)) or v.shape[0] != sum(net.sizes[:-1]):
        return None
    sizes = net.sizes[:-1]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    blocks = [v[offs[k] : offs[k + 1]] for k in range(len(sizes))]
    for k in range(1, net.depth + 1):
        p, p_err = _products(net.weights[k - 1], blocks[k - 1])
        a, b = net.alphas[k - 1], net.betas[k - 1]
        repaired = _repair(p, p_err, blocks[k], a, b, tied)
        if repaired is None:
            return None
        blocks[k] = repaired
    p, p_err = _products(net.weights[-1], blocks[-1])
    size = p.size
    num_root = math.sqrt(float(np.sum(p * p))) * (1.0 - _gamma(size + 4)) - math.sqrt(float(np.sum(p_err**2))) * 1.01
    den = float(np.sum(blocks[0] * blocks[0])) * (1.0 + _gamma(blocks[0].size + 4))
    if not (num_root > 0 and den > 0 and math.isfinite(num_root) and math.isfinite(den)):
        return None
    lower = num_root * num_root * (1.0 - 8 * UNIT_ROUNDOFF) / den * (1.0 - 4 * UNIT_ROUNDOFF)
    return lower if lower > 0 and math.isfinite(lower) else None
