"""The LipSDP matrix inequality, the one piece of mathematics every method and the certifier share.

With the stacked state z = (x_0, x_1, ..., x_l) and diagonal multipliers T_k = diag(t_k) >= 0, LipSDP
asks for M(rho, T) <= 0. We work with its negation F = -M, block-tridiagonal and required to be PSD:

    F_00 = rho I + W_0' diag(2 a_1 b_1 t_1) W_0
    F_kk = 2 diag(t_k) + W_k' diag(2 a_{k+1} b_{k+1} t_{k+1}) W_k          (1 <= k < l)
    F_ll = 2 diag(t_l) - W_l' W_l
    F_{k-1,k} = -W_{k-1}' diag((a_k + b_k) t_k)                           (1 <= k <= l)

(a, b are the per-neuron slope bounds alpha, beta.) For l = 0 the network is linear: F_00 = rho I - W_0'W_0.
If R = F restricted to blocks 1..l is positive definite, the smallest feasible rho is a Schur complement
eigenvalue, rho*(T) = -lambda_min(F_00(0) - F_01 R^-1 F_10), computed here by a backward block recursion
in O(sum n_k^3): any T >= 0 with R > 0 gives a bound with no SDP solver at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg as sla

from lipsdp.network import Network
from lipsdp.scaling import rescale


def split_multipliers(net: Network, t: np.ndarray) -> list[np.ndarray]:
    """Cut the flat multiplier vector (one entry per hidden neuron) into per-layer vectors."""
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    if t.size != net.n_neurons:
        raise ValueError(f"expected {net.n_neurons} multipliers, got {t.size}")
    return np.split(t, np.cumsum(net.hidden_sizes)[:-1]) if net.depth else []


@dataclass
class BlockTridiagonal:
    """A symmetric block-tridiagonal matrix: diagonal blocks D[k], upper blocks U[k] = (k, k+1)."""

    diag: list[np.ndarray]
    upper: list[np.ndarray]

    def dense(self) -> np.ndarray:
        sizes = [d.shape[0] for d in self.diag]
        offs = np.concatenate([[0], np.cumsum(sizes)])
        out = np.zeros((offs[-1], offs[-1]))
        for k, d in enumerate(self.diag):
            out[offs[k] : offs[k + 1], offs[k] : offs[k + 1]] = d
        for k, u in enumerate(self.upper):
            out[offs[k] : offs[k + 1], offs[k + 1] : offs[k + 2]] = u
            out[offs[k + 1] : offs[k + 2], offs[k] : offs[k + 1]] = u.T
        return out

    @property
    def size(self) -> int:
        return int(sum(d.shape[0] for d in self.diag))


def negated_lmi(net: Network, rho: float, t: np.ndarray, absolute: bool = False) -> BlockTridiagonal:
    """F = -M(rho, T) in block form. With `absolute`, the same formulas on |W|, |t|, |a|, |b| (used to
    bound the rounding error committed while forming F)."""
    ts = split_multipliers(net, t)
    ws = net.weights
    l = net.depth
    mag = np.abs if absolute else (lambda x: x)
    sign = 1.0 if absolute else -1.0  # sign of the terms that are subtracted in F
    if l == 0:
        w = mag(ws[0])
        return BlockTridiagonal([rho * np.eye(w.shape[1]) + sign * (w.T @ w)], [])
    diag, upper = [], []
    for k in range(l + 1):
        w = mag(ws[k])
        if k < l:
            s = mag(2.0 * net.alphas[k] * net.betas[k] * ts[k])
            block = w.T @ (s[:, None] * w)
            c = mag((net.alphas[k] + net.betas[k]) * ts[k])
            upper.append(sign * (w.T * c[None, :]))
        else:
            block = sign * (w.T @ w)
        if k == 0:
            block = block + rho * np.eye(w.shape[1])
        else:
            block = block + np.diag(2.0 * mag(ts[k - 1]))
        diag.append(block)
    return BlockTridiagonal(diag, upper)


def schur_rho(net: Network, t: np.ndarray) -> float | None:
    """rho*(T): the smallest rho with F(rho, T) PSD, assuming the hidden part R is positive definite.

    Returns None when R is not (numerically) positive definite, i.e. T certifies nothing. This is a
    floating-point estimate; `lipsdp.certificate` turns it into a proven bound.
    """
    f = negated_lmi(net, 0.0, np.clip(t, 0.0, None))
    s = f.diag[0]
    if net.depth > 0:
        d = f.diag[-1]
        for k in range(net.depth, 0, -1):
            try:
                chol = sla.cho_factor(d, lower=True, check_finite=False)
            except (np.linalg.LinAlgError, ValueError):
                return None
            u = f.upper[k - 1]  # block (k-1, k)
            reduced = u @ sla.cho_solve(chol, u.T, check_finite=False)
            if k > 1:
                d = f.diag[k - 1] - reduced
            else:
                s = s - reduced
    lam = sla.eigvalsh(0.5 * (s + s.T), subset_by_index=[0, 0], check_finite=False)[0]
    if not np.isfinite(lam):
        return None
    return max(0.0, -float(lam))


def sequential_multipliers(net: Network) -> np.ndarray:
    """Multipliers T = tau_k I per layer, chosen one layer at a time; always strictly feasible.

    Forward recursion on the quadratic form x_k' X_k x_k <= |x_0|^2 (X_0 = I): the Schur complement of the
    per-layer inequality gives X_{k+1} = 2 tau I - tau^2 D W (X_k + 2 tau W' A B W)^-1 W' D, D = diag(a + b),
    and tau is chosen to make lambda_min(X_{k+1}) as large as possible (closed form 1 / lambda_max when
    a*b = 0). At the end rho = lambda_max(W_l X_l^-1 W_l'), and rho * tau_k are LipSDP multipliers with
    F(rho, T) >= 0 (the chained Schur complements), so the result is never looser than the naive product.
    """
    x = np.eye(net.sizes[0])
    taus = []
    for k in range(net.depth):
        w = net.weights[k]
        a, b = net.alphas[k], net.betas[k]
        d = a + b
        ab = 2.0 * a * b
        chol = sla.cho_factor(x, lower=True, check_finite=False)
        k_mat = (d[:, None] * w) @ sla.cho_solve(chol, (w * d[:, None]).T, check_finite=False)
        lam = float(sla.eigvalsh(0.5 * (k_mat + k_mat.T), subset_by_index=[k_mat.shape[0] - 1] * 2)[0])
        tau = 1.0 / lam if lam > 1e-300 else 1.0
        if np.any(ab != 0):
            tau = _best_tau(x, w, d, ab, tau)
        x_next = _next_quadratic_form(x, w, d, ab, tau)
        taus.append(np.full(w.shape[0], tau))
        x = 0.5 * (x_next + x_next.T)
    w = net.weights[-1]
    chol = sla.cho_factor(x, lower=True, check_finite=False)
    final = w @ sla.cho_solve(chol, w.T, check_finite=False)
    rho = float(sla.eigvalsh(0.5 * (final + final.T), subset_by_index=[final.shape[0] - 1] * 2)[0])
    # A slightly larger rho keeps the hidden block strictly definite (it is singular at rho exactly when the
    # last layer is orthogonal to some direction, e.g. |x| = relu(x) + relu(-x)); certify recomputes rho.
    rho = max(rho, 1e-300) * (1.0 + 1e-6)
    return rho * np.concatenate(taus) if taus else np.zeros(0)


def _next_quadratic_form(x: np.ndarray, w: np.ndarray, d: np.ndarray, ab: np.ndarray, tau: float) -> np.ndarray:
    p = x + tau * (w.T @ (ab[:, None] * w))
    dw = d[:, None] * w
    return 2.0 * tau * np.eye(w.shape[0]) - tau**2 * (dw @ np.linalg.solve(p, dw.T))


def _best_tau(x: np.ndarray, w: np.ndarray, d: np.ndarray, ab: np.ndarray, tau0: float) -> float:
    """Maximise lambda_min of the next quadratic form over tau (1-D search on log tau)."""
    from scipy.optimize import minimize_scalar

    def negative_min_eig(log_tau: float) -> float:
        xn = _next_quadratic_form(x, w, d, ab, float(np.exp(log_tau)))
        return -float(sla.eigvalsh(0.5 * (xn + xn.T), subset_by_index=[0, 0])[0])

    centre = np.log(tau0)
    res = minimize_scalar(negative_min_eig, bounds=(centre - 3.0, centre + 6.0), method="bounded")
    best = float(np.exp(res.x))
    return best if negative_min_eig(res.x) <= negative_min_eig(centre) else tau0


@dataclass(frozen=True)
class Balancing:
    """Exact power-of-two block scaling D = diag(d_k I) of the LMI: D F(rho, t) D is the LMI of the network
    with weights W_k d_k / d_{k+1}, multipliers d_k^2 t_k (hidden layer k) and rho d_0^2. With d_k powers of
    two every scaled number is exact in floating point (barring overflow), so a proof for the balanced LMI
    is a proof for the original one. Chosen so that every scaled layer has norm about 1."""

    d: np.ndarray  # d_0 .. d_{l+1}, d_{l+1} = 1

    @classmethod
    def of(cls, net: Network) -> Balancing:
        """Power-of-two factors 2^e_k giving every layer a spectral norm of about 1; a layer whose scaling
        would not be exact keeps e_k = 0 (`scaling.rescale` checks that)."""
        wanted = []
        for w in net.weights:
            norm = float(np.linalg.norm(w, 2)) if min(w.shape) <= 512 else float(np.linalg.norm(w))
            wanted.append(-int(np.round(np.log2(norm))) if norm > 0 and np.isfinite(norm) else 0)
        exps = rescale(net, wanted).exponents
        d = np.ones(len(net.weights) + 1)
        for k in range(len(net.weights) - 1, -1, -1):
            d[k] = d[k + 1] * 2.0 ** exps[k]
        return cls(d)

    def network(self, net: Network) -> Network:
        d = self.d
        return replace(net, weights=tuple(w * (d[k] / d[k + 1]) for k, w in enumerate(net.weights)))

    def multipliers(self, net: Network, t: np.ndarray) -> np.ndarray:
        """Original multipliers -> balanced ones."""
        return np.asarray(t) * np.repeat(self.d[1:-1] ** 2, net.hidden_sizes) if net.depth else np.asarray(t)

    def original_multipliers(self, net: Network, t_balanced: np.ndarray) -> np.ndarray:
        return np.asarray(t_balanced) / np.repeat(self.d[1:-1] ** 2, net.hidden_sizes) if net.depth else t_balanced

    def original_rho(self, rho_balanced: float) -> float:
        return rho_balanced / self.d[0] ** 2
