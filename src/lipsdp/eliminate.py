"""LipSDP for one very wide hidden layer, with that layer eliminated from the LMI.

A network x -> W1 phi(W0 x + b0) + b1 whose hidden layer is far wider than its input and output (a
convolution, then pooling and one linear layer: Convnet_avgpool is 784 -> 23328 -> 10) has an LMI of
order n0 + n1, hopeless densely; here every cost is in n0 + n2 and linear in n1.

Proof obligation (the same statement as the full LMI, proved on a smaller matrix). With T = diag(t) > 0
and slope bounds A, B, F(rho, T) = -M(rho, T) = [[F00, F01], [F01', 2T - W1'W1]], F00 = rho I +
W0'(2AB T)W0, F01 = -W0'(A+B)T. By the Schur complement on an identity block, F > 0 iff
[[F00, F01, 0], [F01', 2T, W1'], [0, W1, I]] > 0, and, 2T being diagonal and > 0, iff its Schur complement
on 2T is:

    S(rho, T) = [[rho I - P, Q'], [Q, R]] > 0,   P = 1/2 W0'(B-A)^2 T W0,   Q = 1/2 W1 (A+B) W0,
                                                R = I - 1/2 W1 T^-1 W1'

(2AB - (A+B)^2/2 = -(B-A)^2/2), of order n0 + n2. So rho*(T) = lambda_max(P + Q'R^-1 Q) where R > 0, and
L <= sqrt(rho) for every rho with S(rho, T) > 0. S is formed in float64; each entry is an inner product of
n1 terms of at most four factors (1/t_i rounded once), so |fl(S) - S| <= g_{n1+6} |S|_abs entrywise
(Higham (3.13)); `certificate.prove_forms_positive_definite` then proves S positive definite.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sla

from lipsdp.certificate import RHO_INFLATIONS, Certificate, LmiForms, prove_forms_positive_definite
from lipsdp.descent import Evaluation, LogDescent
from lipsdp.lmi import BlockTridiagonal, add_to_diagonal
from lipsdp.network import Network

# A hidden layer at least this wide, and 4 times wider than input and output together, is eliminated.
MIN_WIDTH = 2048


def applies(net: Network) -> bool:
    """True for one hidden layer much wider than the input and output (where elimination is the cheap way)."""
    if net.depth != 1:
        return False
    n0, n1, n2 = net.sizes
    return n1 >= MIN_WIDTH and n1 >= 4 * (n0 + n2)


class Reduced:
    """The pieces of S(rho, T) for a network of one hidden layer (`applies` need not hold: small nets test it)."""

    def __init__(self, net: Network):
        if net.depth != 1:
            raise ValueError("elimination needs exactly one hidden layer")
        w0, w1 = (np.asarray(w.toarray() if hasattr(w, "toarray") else w, dtype=np.float64) for w in net.weights)
        a, b = np.asarray(net.alphas[0], np.float64), np.asarray(net.betas[0], np.float64)
        self.net, self.w0, self.w1 = net, w0, w1
        self.c = 0.5 * (b - a) ** 2  # P = W0' diag(c t) W0
        self.h = 0.5 * (a + b)  # Q = W1 diag(h) W0
        self.q = (w1 * self.h) @ w0
        self.n0, self.n1, self.n2 = w0.shape[1], w0.shape[0], w1.shape[0]

    def r_factor(self, t: np.ndarray):
        """Cholesky of R = I - 1/2 W1 T^-1 W1', or None when R is not positive definite (T infeasible)."""
        if not np.all(np.isfinite(t) & (t > 0)):
            return None
        r = add_to_diagonal(-(self.w1 * (0.5 / t)) @ self.w1.T, 1.0)
        try:
            return sla.cho_factor(r, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return None

    def rho(self, t: np.ndarray, v0: np.ndarray | None = None) -> tuple[float, np.ndarray] | None:
        """rho*(T) = lambda_max(P + Q'R^-1 Q) and its unit eigenvector, by Lanczos on the operator (never
        forms P), or None when R is not positive definite."""
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

        chol = self.r_factor(t)
        if chol is None:
            return None
        ct = self.c * t

        def apply(v: np.ndarray) -> np.ndarray:
            v = v.reshape(-1)
            return self.w0.T @ (ct * (self.w0 @ v)) + self.q.T @ sla.cho_solve(chol, self.q @ v, check_finite=False)

        op = LinearOperator((self.n0, self.n0), matvec=apply, dtype=np.float64)
        if v0 is None:  # a fixed start (eigsh's default is random): the same T gives the same answer
            v0 = np.ones(self.n0) + 1e-3 * np.cos(np.arange(self.n0))
        try:
            vals, vecs = eigsh(op, k=1, which="LA", v0=v0, tol=1e-10, maxiter=20 * self.n0)
        except ArpackNoConvergence:
            return None
        return float(vals[0]), vecs[:, 0]

    def gradient(self, t: np.ndarray, v: np.ndarray) -> np.ndarray:
        """d lambda_max / d t_i at a simple top eigenvalue with unit eigenvector v:
        c_i (W0 v)_i^2 - 1/2 (W1' R^-1 Q v)_i^2 / t_i^2."""
        chol = self.r_factor(t)
        y = sla.cho_solve(chol, self.q @ v, check_finite=False)
        return self.c * (self.w0 @ v) ** 2 - 0.5 * (self.w1.T @ y) ** 2 / t**2

    def forms(self, t: np.ndarray, scale: float) -> LmiForms:
        """S(0, T) of the network with W0 scaled by the power of two `scale` (exact), and the row sums of its
        absolute-value form (|W0|' (c t) (|W0| 1) and the like: the row sums of the products, never the
        products)."""
        w0 = self.w0 * scale
        ct, half_inv = self.c * t, 0.5 / t
        s00 = -((w0 * ct[:, None]).T @ w0)
        s01 = (w0 * self.h[:, None]).T @ self.w1.T  # = (scale Q)'
        s11 = add_to_diagonal(-(self.w1 * half_inv) @ self.w1.T, 1.0)
        a0, a1, ah = np.abs(w0), np.abs(self.w1), np.abs(self.h)
        ones0, ones2 = np.ones(self.n0), np.ones(self.n2)
        sums0 = a0.T @ (np.abs(ct) * (a0 @ ones0)) + a0.T @ (ah * (a1.T @ ones2))
        sums1 = ones2 + a1 @ (half_inv * (a1.T @ ones2)) + a1 @ (ah * (a0 @ ones0))
        return LmiForms(BlockTridiagonal([s00, s11], [s01]), np.concatenate([sums0, sums1]))


def rho_from_forms(forms: LmiForms) -> float | None:
    """rho*(T) = lambda_max(-S00 + S01 S11^-1 S01') from the formed blocks (dense, order n0), or None."""
    s00, s11 = forms.f0.diag
    s01 = forms.f0.upper[0]
    try:
        chol = sla.cho_factor(s11, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    m = -s00 + s01 @ sla.cho_solve(chol, s01.T, check_finite=False)
    return float(sla.eigvalsh(0.5 * (m + m.T), subset_by_index=[m.shape[0] - 1] * 2)[0])


def certify(net: Network, t: np.ndarray) -> Certificate | None:
    """A proven bound from multipliers t > 0 through S(rho, T) (module docstring), or None.

    W0 is scaled by a power of two 2^e ~ 1/sqrt(rho*) (exact; rho* estimated by Lanczos, so S is formed
    once), so that rho I and R have comparable size in the rounding margin; the proven rho is divided back
    by 4^e (exact)."""
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    if net.depth != 1 or t.size != net.n_neurons or not np.all(np.isfinite(t)) or not np.all(t > 0):
        return None
    red = Reduced(net)
    estimate = red.rho(t)
    rho_guess = estimate[0] if estimate is not None and estimate[0] > 0 else 1.0
    scale = 2.0 ** -round(math.log2(rho_guess) / 2.0)
    forms = red.forms(t, scale)
    rho_b = rho_from_forms(forms)
    if rho_b is None or not math.isfinite(rho_b) or rho_b < 0:
        return None
    unit = max(rho_b, 1e-200)
    for inflation in RHO_INFLATIONS:
        rho_try = rho_b + inflation * unit
        proven = prove_forms_positive_definite(forms, rho_try, red.n1 + 6, headroom=rho_try - rho_b)
        if proven is not None:
            rho = rho_try / (scale * scale)  # exact: a power of two
            estimate = rho_b / (scale * scale)
            return Certificate(math.nextafter(math.sqrt(rho), math.inf), rho, estimate, t.copy(), proven)
    return None


def layer_multipliers(net: Network) -> np.ndarray:
    """The best T = tau I (LipSDP-Layer for one hidden layer): rho*(tau I) = lambda_max(tau P1 + Q'R(tau)^-1 Q)
    is convex in tau (a partial minimum of an LMI), minimised on log tau over tau > 1/2 lambda_max(W1 W1'),
    where R > 0. P1 is formed once (one n1 n0^2 product); each evaluation is then of order n0 + n2."""
    from scipy.optimize import minimize_scalar

    red = Reduced(net)
    p1 = (red.w0 * red.c[:, None]).T @ red.w0
    ww = red.w1 @ red.w1.T
    floor = 0.5 * float(sla.eigvalsh(ww, subset_by_index=[ww.shape[0] - 1] * 2)[0]) if red.n2 else 0.0

    def rho_at(log_tau: float) -> float:
        tau = math.exp(log_tau)
        r = add_to_diagonal(-(0.5 / tau) * ww, 1.0)  # R(tau I) from W1 W1', formed once
        try:
            chol = sla.cho_factor(r, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return 1e300
        m = tau * p1 + red.q.T @ sla.cho_solve(chol, red.q, check_finite=False)
        return float(sla.eigvalsh(0.5 * (m + m.T), subset_by_index=[red.n0 - 1] * 2)[0])

    if floor <= 0:  # no output coupling: any tau > 0 works and rho shrinks with tau
        return np.full(red.n1, 1e-12)
    lo = math.log(floor) + 1e-9
    res = minimize_scalar(rho_at, bounds=(lo, lo + 30.0), method="bounded", options={"xatol": 1e-6})
    return np.full(red.n1, math.exp(res.x))


def neuron_multipliers(net: Network, t0: np.ndarray, deadline: float) -> tuple[np.ndarray, int]:
    """Per-neuron T by L-BFGS on log t from t0 (rho* and its gradient by Lanczos on the operator), until
    converged or past `deadline` (time.perf_counter()). Returns the best T seen (never worse than t0) and
    the number of evaluations."""
    red = Reduced(net)
    start = red.rho(t0)
    if start is None:
        return t0, 0

    def evaluate(t: np.ndarray, v0: np.ndarray | None) -> Evaluation:
        out = red.rho(t, v0)
        return None if out is None else (out[0], red.gradient(t, out[1]), out[1])

    descent = LogDescent(evaluate, t0, (start[0], np.zeros(0), start[1]), deadline, logarithmic=False)
    descent.run(10_000, options={"gtol": 1e-12})
    return descent.best_t, descent.evaluations - 1
