"""Anytime LipSDP-Neuron: minimise the exact bound rho*(T) over the multipliers directly (no SDP solver).

Guarantee: the returned `upper` is a verified upper bound (proved in float64 by `lipsdp.certificate`) at
any stopping time, never looser than the layer-by-layer bound (`sequential`) it starts from; with enough
budget it reaches the LipSDP-Neuron optimum from above. `raw` is the optimiser's own, unverified value.

The bound. For multipliers T whose hidden block R(T) of F = -M is positive definite, the best rho is
rho*(T) = lambda_max(W_0' H_1 W_0), from the backward block recursion (formulas of F in `lipsdp.lmi`)

    H_{l+1} = I,   D_k = 2 diag(t_k) - W_k' H_{k+1} W_k   (all positive definite <=> R(T) > 0),
    H_k = diag(c_k t_k) D_k^-1 diag(c_k t_k) - diag(2 a_k b_k t_k),      c_k = a_k + b_k,

so every T in that convex domain gives a bound, and rho* is convex there (the Schur complement is matrix
convex in T). A wide first layer is reduced to the hidden width: W_0' H W_0 has the nonzero eigenvalues
of B H B' with B'B = W_0 W_0' (784 -> 128 on MNIST nets). Derivatives need no autograd: for a unit
eigenvector u the completion x_0 = u, y_k = W_{k-1} x_{k-1}, x_k = D_k^-1 diag(c_k t_k) y_k minimises
z'F(0, T)z, so (envelope theorem) d lambda / d t_i = -2 (x_i - a_i y_i)(x_i - b_i y_i); the exact Hessian
follows from the spectral-function formula of Lewis and Sendov and the second derivative of the Schur
complement, 2 c_i' R^-1 c_j, evaluated through the block factorisation the recursion already made.

The optimiser. rho* is a largest eigenvalue, nonsmooth where it is multiple, which it typically is at the
optimum (multiplicity 4-5 on the MNIST nets); plain gradient or Adam steps stall there. So we minimise

    phi(s) = log f_mu(T) - eps log det R(T),   f_mu = mu log sum_j exp(lambda_j / mu),   t = exp(s),

(lambda_max <= f_mu <= lambda_max + mu log n) with BFGS and a weak Wolfe line search (Lewis and Overton,
Math. Program. 2013), by continuation: mu = 1e-2 rho first, then divided by 10 each time the level has
converged (its objective stopped decreasing over a window of steps, or the Newton decrement is tiny), down
to 1e-10 rho. log t keeps t > 0 and makes steps scale-free; the log of f keeps deep nets, whose bound spans
decades, well scaled. A trial point outside the domain (a failed Cholesky) counts as +inf, so the line
search shortens that step only; every new step starts again from the full step (at most a factor e^2 per
multiplier). The exact Hessian is computed as often as a deterministic cost model lets it take a fixed
share of the work; its Newton step is tried first and replaces the quasi-Newton model when the full step
is accepted (fast local convergence on nets of a few hundred neurons), else BFGS goes on.

Keeping proofs possible. On deep nets the bound stays finite as R(T) becomes singular, and iterates drift
to where R is singular to 1e-11: no floating-point proof resolves that. Two guards: the optimiser works on
an LMI with a relative margin 2 MARGIN diag(T) on the hidden block (an exact reparametrisation with
slightly wider slopes, `_with_margin`), and a small barrier -eps log det R (eps = 1e-2 mu / rho, at least
1e-9) keeps the path inside. Only accepted iterates (not line-search trials) count as the best point.

One multiplier per channel first. On a CNN (a hidden layer that is a recorded convolution's output) the
descent first moves log t only within the subspace s0 + P x, one variable x_c per channel (every neuron of
a channel scaled by the same factor from the warm start; dense layers keep one per neuron), for
TIED_FRACTION of the budget or of the steps, then goes on per neuron from the best point. Every point of
the subspace is a multiplier vector like any other, so nothing changes for soundness; with far fewer
variables (124 instead of 3172 on a CIFAR-10 CNN) the quasi-Newton model is good after far fewer of the
(seconds-long) evaluations.

Wide layers eliminated. Where `lipsdp.reduced` eliminates wide ReLU layers (from 4096 neurons: the first
convolutions of CIFAR-10 CNNs), one dense evaluation would cost minutes; there the descent runs on the
reduced LMI instead (`_on_reduced_lmi`): rho*(T) and its gradient from `Reduction.rho_gradient` (the
same rho*(T), the minimiser completed on the eliminated layers by a diagonal solve), L-BFGS on log rho over
log t, per channel first, then per neuron, on the CPU. Its proof is the reduced LMI's, as for `sequential`.

It stops when the time `budget` or the `steps` are used up, or when it has converged: at the finest
smoothing, repeated fresh restarts from the best point gain less than `tol` (relative). The notes say how
many steps it took and why it stopped. Warm start: the layer-by-layer multipliers
(`lmi.sequential_multipliers`). CPU or CUDA (torch, float64).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from lipsdp import eliminate, reduced
from lipsdp.descent import OPTIONS as DESCENT_OPTIONS
from lipsdp.descent import LogDescent
from lipsdp.lmi import Balancing, schur_rho, sequential_multipliers
from lipsdp.methods import MethodOutput, verified_output
from lipsdp.network import Network, dense_weights
from lipsdp.weights import dense

log = logging.getLogger(__name__)

MU_START = 1e-2  # first smoothing temperature, relative to the bound rho
MU_FINEST = 1e-10  # last one: far below anything the certificate resolves
MU_FACTOR = 0.1
WINDOW = 20  # steps over which a smoothing level must still decrease the objective ...
WINDOW_FRACTION = 0.01  # ... by this fraction of its temperature, else the next level starts
DECREMENT = 1e-4  # a step predicting a decrease below this fraction of the temperature ends the level
CONVERGED_RESTARTS = 3  # fresh restarts at the finest level without gain that count as convergence
LINE_SEARCH_EVALS = 40
WOLFE_ARMIJO, WOLFE_CURVATURE = 1e-4, 0.5
FULL_BFGS_MAX = 3000  # above this many multipliers, limited-memory BFGS
LBFGS_MEMORY = 40
HESSIAN_REFRESH = 0.5  # exact Hessian again once the evaluations since the last one cost this times as much
HESSIAN_MAX_COST = 64.0  # no exact Hessian dearer than this many evaluations (many near-top eigenvalues, as
# when W_0 = I: its cost grows with their number, and one call must not outrun the budget by minutes)
CURVATURE_BYTES = 2**28  # the Schur curvature's eigenvector batches are cut to keep its blocks this small
BARRIER, BARRIER_MIN = 0.01, 1e-9  # barrier weight: BARRIER * mu / rho, at least BARRIER_MIN
MAX_STEP = 2.0  # largest change of any log t in one unit step
MARGIN = 1e-7  # relative margin kept on the hidden block of the LMI (see _with_margin)
FALLBACK_CANDIDATES = 3  # earlier iterates certified when the best one's proof fails
TIED_FRACTION = 0.5  # share of the budget spent first on one multiplier per channel (convolutions)
CALL_FLOPS = 1e5  # the cost model's charge for one torch call (overhead), in floating-point operations


@dataclass
class _Point:
    """One evaluated multiplier vector: s = log t, the top eigenvalue rho (a bound when feasible), all
    eigenvalues and eigenvectors of the reduced Schur complement, and the factors the gradient reuses."""

    s: object
    t_layers: list
    chols: list
    dinvs: list
    lam: object
    vecs: object
    rho: float
    logdet: float  # log det R(T), for the barrier


class _Objective:
    """rho*(T) of the balanced network in torch (float64, CPU or CUDA), with its analytic gradient."""

    def __init__(self, net: Network, device: str) -> None:
        import torch

        self.torch = torch
        kw = {"dtype": torch.float64, "device": device}
        self.kw = kw
        self.weights = [torch.as_tensor(dense(w), **kw) for w in net.weights]
        self.alphas = [torch.as_tensor(a, **kw) for a in net.alphas]
        self.betas = [torch.as_tensor(b, **kw) for b in net.betas]
        self.sizes = list(net.hidden_sizes)
        w_last = self.weights[-1]
        self.gram_last = w_last.T @ w_last
        w0 = dense(net.weights[0])
        n1, n0 = w0.shape
        if n1 < n0:  # B'B = W_0 W_0' with B square: the eigenproblem shrinks to n_1
            lam, vecs = np.linalg.eigh(w0 @ w0.T)
            b = (vecs * np.sqrt(np.clip(lam, 0.0, None))).T
            self.b = torch.as_tensor(np.ascontiguousarray(b), **kw)
        else:
            self.b = self.weights[0].T.contiguous()
        self.evaluations = 0
        self.best_rho = math.inf
        self.best_s = None
        self.start_s = None  # the first iterate (the warm start)
        self.start_rho = math.inf
        self.candidates: list = []  # (rho, s): the best iterate at the end of each level

    @property
    def exact_hessian(self) -> bool:
        """Whether the exact Hessian is affordable (its cost and memory grow with the neurons squared)."""
        return sum(self.sizes) <= FULL_BFGS_MAX

    def point(self, s) -> _Point | None:
        """Evaluate rho* at t = exp(s); None outside the domain (some D_k not positive definite)."""
        torch = self.torch
        self.evaluations += 1
        t_layers = list(torch.split(torch.exp(s), self.sizes))
        chols = [None] * len(self.sizes)
        dinvs = [None] * len(self.sizes)
        h = None
        for k in range(len(self.sizes), 0, -1):
            t = t_layers[k - 1]
            w = self.weights[k]
            gram = self.gram_last if h is None else w.T @ h @ w
            d = torch.diag(2.0 * t) - gram
            chol, info = torch.linalg.cholesky_ex(d)
            if int(info) != 0:  # R(T) is not positive definite
                return None
            chols[k - 1] = chol
            dinvs[k - 1] = torch.cholesky_inverse(chol)
            ct = (self.alphas[k - 1] + self.betas[k - 1]) * t
            h = torch.outer(ct, ct) * dinvs[k - 1]
            h = h - torch.diag(2.0 * self.alphas[k - 1] * self.betas[k - 1] * t)
        schur = self.b @ h @ self.b.T
        if not bool(torch.isfinite(schur).all()):
            return None
        try:
            lam, vecs = torch.linalg.eigh(0.5 * (schur + schur.T))
        except torch.linalg.LinAlgError:  # no convergence: treat like a point outside the domain
            return None
        logdet = 2.0 * float(sum(torch.sum(torch.log(torch.diagonal(c))) for c in chols))
        return _Point(s, t_layers, chols, dinvs, lam, vecs, max(float(lam[-1]), 0.0), logdet)

    def accept(self, pt: _Point) -> None:
        """Record an iterate of the descent; the best one is the answer. (Trial points of a line search are
        not recorded: those that failed the sufficient decrease may sit closer to the boundary of the
        domain than the certificate can resolve.)"""
        if pt.rho < self.best_rho:
            self.best_rho, self.best_s = pt.rho, pt.s.clone()

    def smoothed(self, pt: _Point, mu: float, eps: float = 0.0) -> float:
        """log f_mu - eps log det R: the log of the soft-max of the eigenvalues at temperature mu (mu = 0:
        log lambda_max) plus the barrier of the domain with weight eps."""
        value = mu * float(self.torch.logsumexp(pt.lam / mu, 0)) if mu > 0.0 else float(pt.lam[-1])
        return (math.log(value) if value > 0.0 else -math.inf) - eps * pt.logdet

    def gradient(self, pt: _Point, mu: float, eps: float = 0.0):
        """Gradient of log f_mu - eps log det R with respect to s = log t."""
        grad = self._smoothed_gradient(pt, mu)
        return grad - eps * self.logdet_gradient(pt) if eps > 0.0 else grad

    def logdet_gradient(self, pt: _Point):
        """d log det R / d s_i = t_i tr(R^-1 dR/dt_i), from the blocks of R^-1 next to the diagonal
        (selected inversion over the factorisation the recursion made: Sigma_1 = D_1^-1,
        (R^-1)_{k+1,k} = M_k Sigma_k, Sigma_{k+1} = D_{k+1}^-1 + M_k Sigma_k M_k', M_k = D_{k+1}^-1 diag(c t) W).
        dR/dt_i adds 2 at (i, i), 2ab w w' to the previous layer's block and -(a + b) w next to it."""
        torch = self.torch
        out = []
        sigma = None
        for k, t in enumerate(pt.t_layers):
            a, b = self.alphas[k], self.betas[k]
            if sigma is None:
                sigma = pt.dinvs[k]
                term = 2.0 * torch.diagonal(sigma)
            else:
                w = self.weights[k]
                m = pt.dinvs[k] @ (((a + b) * t)[:, None] * w)
                ws = w @ sigma
                cross = (ws * m).sum(1)  # (W (R^-1)_{k-1,k})_ii
                quad = (ws * w).sum(1)  # (W Sigma_{k-1} W')_ii
                sigma = pt.dinvs[k] + m @ sigma @ m.T
                term = 2.0 * torch.diagonal(sigma) + 2.0 * a * b * quad - 2.0 * (a + b) * cross
            out.append(term * t)
        return torch.cat(out)

    def _smoothed_gradient(self, pt: _Point, mu: float):
        """Gradient of log f_mu with respect to s = log t."""
        torch = self.torch
        lam = pt.lam
        if mu > 0.0:
            weights = torch.softmax(lam / mu, 0)
            keep = weights > 1e-16 * weights[-1]
            vecs, weights = pt.vecs[:, keep], weights[keep]
            value = mu * float(torch.logsumexp(lam / mu, 0))
        else:
            vecs, weights = pt.vecs[:, -1:], torch.ones(1, **self.kw)
            value = float(lam[-1])
        y = self.b.T @ vecs
        grads = []
        for k, t in enumerate(pt.t_layers):
            a, b = self.alphas[k], self.betas[k]
            x = torch.cholesky_solve(((a + b) * t)[:, None] * y, pt.chols[k])
            grads.append(-2.0 * ((x - a[:, None] * y) * (x - b[:, None] * y)) @ weights)
            if k + 1 < len(pt.t_layers):
                y = self.weights[k + 1] @ x
        return torch.cat(grads) * torch.exp(pt.s) / value


    def hessian_cost(self, pt: _Point, mu: float) -> float:
        """Cost of `hessian` (and inverting it) in units of one evaluation with its gradient: a flop count
        plus a fixed charge per torch call (CALL_FLOPS), so that the schedule is deterministic."""
        torch = self.torch
        w = torch.softmax(pt.lam / mu, 0)
        r = int((w > 1e-12 * w[-1]).sum())
        hidden = self.sizes
        depth, n, m = len(hidden), sum(hidden), int(self.b.shape[0])
        after = np.cumsum(hidden[::-1])[::-1]  # neurons in layers k..l
        evaluation = 2.0 * m * hidden[0] * (hidden[0] + m) + 9.0 * m**3 + CALL_FLOPS * (12 * depth + 10)
        r += 2  # the barrier's two column sets
        hess = 2.0 * n * n * m * (1 + r) + n**3 + CALL_FLOPS * (25 * r + 15 * depth + 20)
        for k, nk in enumerate(hidden):
            evaluation += nk**3
            hess += 2.0 * nk * nk * m + r * nk * after[k] * (nk + 2.0 * after[k])
            if k + 1 < depth:
                nn = hidden[k + 1]
                evaluation += 2.0 * nk * nn * (nk + nn)
                hess += 2.0 * nk * nn * m + 2.0 * r * nn * after[k + 1] * (nn + nk)
        return hess / evaluation

    def hessian(self, pt: _Point, mu: float, eps: float = 0.0):
        """Exact Hessian and gradient of log f_mu - eps log det R with respect to s = log t (mu > 0)."""
        hess, grad = self.smoothed_hessian(pt, mu)
        if eps > 0.0:
            t_all = self.torch.exp(pt.s)
            barrier_grad = -self.logdet_gradient(pt)
            barrier = t_all[:, None] * self.barrier_hessian(pt) * t_all[None, :] + self.torch.diag(barrier_grad)
            hess, grad = hess + eps * barrier, grad + eps * barrier_grad
        return hess, grad

    def smoothed_hessian(self, pt: _Point, mu: float):
        """Exact Hessian of log f_mu with respect to s = log t (mu > 0), with the gradient.

        With E_i = dS/dt_i in the eigenbasis (rank two: -(p_i q_i' + q_i p_i'), p = x - a y, q = x - b y on
        the completions of all eigenvectors), the Hessian in t is
        sum_ab G_ab E_i[a,b] E_j[a,b] + (sum_a w_a E_i[a,a] E_j[a,a] - g_i g_j) / mu + sum_a w_a u_a' S_ij u_a,
        G_ab = (w_a - w_b) / (lambda_a - lambda_b) (Lewis and Sendov's formula for spectral functions), and
        u' S_ij u = 2 c_i' R^-1 c_j with c_i = (dF/dt_i) z on the completion z of u (envelope theorem on
        min_x z'F z). Pairs with both weights below 1e-12 of the largest are dropped (their G is ~0)."""
        torch = self.torch
        lam, vecs = pt.lam, pt.vecs
        w = torch.softmax(lam / mu, 0)
        value = mu * float(torch.logsumexp(lam / mu, 0))
        top = torch.nonzero(w > 1e-12 * w[-1]).flatten()
        in_top = torch.zeros(lam.numel(), dtype=torch.bool, device=lam.device)
        in_top[top] = True
        # completions of every eigenvector: p, q per neuron (rows) and eigenvector (columns)
        y = self.b.T @ vecs
        ps, qs = [], []
        for k, t in enumerate(pt.t_layers):
            a, b = self.alphas[k][:, None], self.betas[k][:, None]
            x = torch.cholesky_solve(((self.alphas[k] + self.betas[k]) * t)[:, None] * y, pt.chols[k])
            ps.append(x - a * y)
            qs.append(x - b * y)
            if k + 1 < len(pt.t_layers):
                y = self.weights[k + 1] @ x
        p, q = torch.cat(ps), torch.cat(qs)
        dlam = -2.0 * p * q  # column a: d lambda_a / d t
        g_t = dlam @ w
        hess = ((dlam * w) @ dlam.T - torch.outer(g_t, g_t)) / mu
        for a in top.tolist():
            e = -(p[:, a : a + 1] * q + q[:, a : a + 1] * p)  # column b: E[a, b] over the neurons
            delta = lam[a] - lam
            near = torch.abs(delta) <= mu
            safe = torch.where(delta == 0, torch.ones_like(delta), delta)
            ratio = torch.where(delta == 0, torch.full_like(delta, 1.0 / mu), torch.expm1(delta / mu) / safe)
            gamma = torch.where(near, w * ratio, (w[a] - w) / safe)
            gamma = gamma * torch.where(in_top, 1.0, 2.0)  # pairs (a, b), b outside the top, occur once
            gamma[a] = 0.0
            hess = hess + (e * gamma) @ e.T
        hess = hess + self._schur_curvature(pt, p[:, top], q[:, top], w[top])
        t_all = torch.exp(pt.s)
        g_s = t_all * g_t / value
        hess = (t_all[:, None] * hess * t_all[None, :] + torch.diag(t_all * g_t)) / value - torch.outer(g_s, g_s)
        return 0.5 * (hess + hess.T), g_s

    def _schur_curvature(self, pt: _Point, p, q, w):
        """sum_a w_a 2 C_a' R^-1 C_a: the curvature of the Schur complement itself; column i of C_a is
        (dF/dt_i) z_a on the completion z_a = (p, q) of eigenvector a."""
        root = self.torch.sqrt(w)
        own = (p + q) * root  # 2x - (a + b) y at the neuron itself
        prev = -(self._stack(self.alphas)[:, None] * q + self._stack(self.betas)[:, None] * p) * root
        n = sum(self.sizes)
        out = self.torch.zeros(n, n, **self.kw)
        batch = max(1, CURVATURE_BYTES // (8 * max(self.sizes) * n))  # the sum over eigenvectors, in batches
        for first in range(0, own.shape[1], batch):
            for lo, z in self._whitened(pt, own[:, first : first + batch], prev[:, first : first + batch]):
                flat = z.reshape(-1, z.shape[-1])
                out[lo:, lo:] += 2.0 * (flat.T @ flat)
        return out

    def barrier_hessian(self, pt: _Point):
        """Hessian of -log det R in t: tr(R^-1 A_i R^-1 A_j) with dR/dt_i = A_i = u_i v_i' + v_i u_i',
        u_i = e_i - a_i w_i, v_i = e_i - b_i w_i (w_i: neuron i's weights, in the previous layer's block), so
        it is 2 ((U'R^-1 U) o (V'R^-1 V) + (U'R^-1 V) o (V'R^-1 U))."""
        torch = self.torch
        n = sum(self.sizes)
        ones = torch.ones(n, 1, **self.kw)
        own = torch.cat([ones, ones], 1)
        prev = -torch.cat([self._stack(self.alphas)[:, None], self._stack(self.betas)[:, None]], 1)
        uu, vv, uv = (torch.zeros(n, n, **self.kw) for _ in range(3))
        for lo, z in self._whitened(pt, own, prev):
            zu, zv = z[:, 0, :], z[:, 1, :]
            uu[lo:, lo:] += zu.T @ zu
            vv[lo:, lo:] += zv.T @ zv
            uv[lo:, lo:] += zu.T @ zv
        return 2.0 * (uu * vv + uv * uv.T)

    def _stack(self, per_layer):
        return self.torch.cat(list(per_layer))

    def _whitened(self, pt: _Point, own, prev):
        """For a batch of r column sets C (column i: own[i] at neuron i plus prev[i] times neuron i's
        weights in the previous layer's block), the factors Z_k = L_k^-1 V_k with C'R^-1 C = sum_k Z_k'Z_k,
        from the block UDU' factorisation the recursion made (V_k = C_k - R_{k,k+1} D_{k+1}^-1 V_{k+1}).
        Yields (offset of layer k, Z_k of shape (n_k, r, neurons in layers k..l))."""
        torch = self.torch
        sizes = self.sizes
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        n, depth, r = offsets[-1], len(sizes), own.shape[1]
        owns, prevs = torch.split(own, sizes), torch.split(prev, sizes)
        v = None
        for k in range(depth - 1, -1, -1):
            nk, lo = sizes[k], offsets[k]
            cols = n - lo
            block = torch.zeros(nk, r, cols, **self.kw)
            idx = torch.arange(nk, device=block.device)
            block[idx, :, idx] = owns[k]
            if k + 1 < depth:
                wk = self.weights[k + 1]  # (n_{k+1}, n_k)
                block[:, :, nk : nk + sizes[k + 1]] += torch.einsum("ji,ja->iaj", wk, prevs[k + 1])
                ct = (self.alphas[k + 1] + self.betas[k + 1]) * pt.t_layers[k + 1]
                carried = wk.T @ (ct[:, None] * (pt.dinvs[k + 1] @ v.reshape(sizes[k + 1], -1)))
                block[:, :, nk:] += carried.reshape(nk, r, cols - nk)
            v = block
            yield lo, torch.linalg.solve_triangular(pt.chols[k], v.reshape(nk, -1), upper=False).reshape(nk, r, cols)


class _TiedPoint:
    """A point of `_Tied`: x (the tied coordinates, what the descent moves) and the full point."""

    def __init__(self, x, full: _Point) -> None:
        self.s, self.full, self.rho = x, full, full.rho


class _Tied:
    """The objective restricted to log t = s0 + P x: one variable per group of neurons (per channel of a
    convolution), moving every multiplier of the group by the same factor from the start s0. A subset of
    the multipliers, so every point is still a valid bound; fewer variables converge in far fewer steps.
    Improvements are recorded in the full objective (its best point and candidates, in full coordinates)."""

    def __init__(self, base: _Objective, s0, groups, n_groups: int) -> None:
        self.base, self.s0, self.groups, self.n = base, s0, groups, n_groups
        self.kw = base.kw
        self.candidates: list = []
        self.best_rho, self.best_s = math.inf, None
        self.start_s, self.start_rho = None, math.inf

    @property
    def evaluations(self) -> int:
        return self.base.evaluations

    @property
    def exact_hessian(self) -> bool:
        return self.base.exact_hessian

    def full(self, x):
        return self.s0 + x[self.groups]

    def point(self, x) -> _TiedPoint | None:
        pt = self.base.point(self.full(x))
        return None if pt is None else _TiedPoint(x, pt)

    def accept(self, pt: _TiedPoint) -> None:
        if pt.rho < self.best_rho:
            self.best_rho, self.best_s = pt.rho, pt.s.clone()
        self.base.accept(pt.full)

    def smoothed(self, pt: _TiedPoint, mu: float, eps: float = 0.0) -> float:
        return self.base.smoothed(pt.full, mu, eps)

    def _reduce(self, g):
        return self.base.torch.zeros(self.n, **self.kw).index_add_(0, self.groups, g)

    def gradient(self, pt: _TiedPoint, mu: float, eps: float = 0.0):
        return self._reduce(self.base.gradient(pt.full, mu, eps))

    def hessian_cost(self, pt: _TiedPoint, mu: float) -> float:
        return self.base.hessian_cost(pt.full, mu)

    def hessian(self, pt: _TiedPoint, mu: float, eps: float = 0.0):
        hess, grad = self.base.hessian(pt.full, mu, eps)
        torch = self.base.torch
        rows = torch.zeros(self.n, hess.shape[1], **self.kw).index_add_(0, self.groups, hess)
        return torch.zeros(self.n, self.n, **self.kw).index_add_(1, self.groups, rows), self._reduce(grad)


def _channel_groups(net: Network) -> tuple[np.ndarray, int] | None:
    """Group of every hidden neuron: its channel where the layer is a recorded convolution's output, else
    the neuron itself. None when that would not reduce the number of variables by at least 4x."""
    groups, offset = [], 0
    for k, size in enumerate(net.hidden_sizes):
        op = net.operators[k] if k < len(net.operators) else None
        shape = getattr(op, "out_shape", None)
        if shape is not None and math.prod(shape) == size:
            groups.append(offset + np.arange(size) // (size // shape[0]))
            offset += shape[0]
        else:
            groups.append(offset + np.arange(size))
            offset += size
    return (np.concatenate(groups), offset) if offset * 4 <= net.n_neurons else None


class _QuasiNewton:
    """Inverse-Hessian BFGS (dense up to FULL_BFGS_MAX variables, else limited memory)."""

    def __init__(self, n: int, kw: dict) -> None:
        self.n, self.kw = n, kw
        self.dense = n <= FULL_BFGS_MAX
        self.reset()

    def reset(self) -> None:
        self.h = None
        self.pairs: list = []
        self.gamma = None

    @property
    def fresh(self) -> bool:
        return self.gamma is None

    def direction(self, g):
        import torch

        if self.gamma is None:  # a unit step on the largest coordinate of the steepest descent direction
            return -g / max(float(torch.max(torch.abs(g))), 1e-300)
        if self.dense:
            return -(self.h @ g)
        q = g.clone()  # two-loop recursion
        alphas = []
        for s, y, r in reversed(self.pairs):
            alpha = r * float(s @ q)
            q = q - alpha * y
            alphas.append(alpha)
        q = self.gamma * q
        for (s, y, r), alpha in zip(self.pairs, reversed(alphas)):
            q = q + (alpha - r * float(y @ q)) * s
        return -q

    def set_hessian(self, hess) -> bool:
        """Replace the inverse-Hessian model by the inverse of `hess`, shifted until positive definite."""
        import torch

        if not self.dense:
            return False
        scale = float(torch.max(torch.abs(torch.diagonal(hess))))
        if not (math.isfinite(scale) and scale > 0.0):
            return False
        eye = torch.eye(self.n, **self.kw)
        for shift in (0.0, *(scale * 10.0**e for e in range(-12, 1))):
            chol, info = torch.linalg.cholesky_ex(hess + shift * eye)
            if int(info) == 0:
                inverse = torch.cholesky_inverse(chol)
                if bool(torch.isfinite(inverse).all()):
                    self.h, self.gamma = inverse, 1.0
                    return True
        return False

    def update(self, s, y) -> None:
        import torch

        sy = float(s @ y)
        if not sy > 0.0:
            return
        r = 1.0 / sy
        if self.gamma is None:
            self.gamma = sy / float(y @ y)
            if self.dense:
                self.h = self.gamma * torch.eye(self.n, **self.kw)
        if self.dense:
            # H+ = H - r (s hy' + hy s') + (r^2 y'Hy + r) s s', as one in-place rank-2 product
            hy = self.h @ y
            pair = torch.stack([s, hy], 1)
            coef = torch.tensor([[r * r * float(y @ hy) + r, -r], [-r, 0.0]], **self.kw)
            self.h.addmm_(pair, coef @ pair.T)
        else:
            self.pairs.append((s, y, r))
            if len(self.pairs) > LBFGS_MEMORY:
                self.pairs.pop(0)
            self.gamma = sy / float(y @ y)


def _line_search(obj: _Objective, x, phi0: float, g0, p, mu: float, eps: float, deadline: float):
    """Weak Wolfe bracketing (doubling, bisection). Returns (point, phi, gradient, wolfe_met, step) for the
    best point with sufficient decrease, or None when none was found."""
    gp = float(g0 @ p)
    if not gp < 0.0:
        return None
    lo, hi, step = 0.0, math.inf, 1.0
    best = None
    for _ in range(LINE_SEARCH_EVALS):
        pt = obj.point(x + step * p)
        phi = obj.smoothed(pt, mu, eps) if pt is not None else math.inf
        if not phi <= phi0 + WOLFE_ARMIJO * step * gp:
            hi = step
        else:
            g = obj.gradient(pt, mu, eps)
            if best is None or phi < best[1]:
                best = (pt, phi, g, False, step)
            if float(g @ p) >= WOLFE_CURVATURE * gp:
                return pt, phi, g, True, step
            lo = step
        step = 0.5 * (lo + hi) if math.isfinite(hi) else 2.0 * lo
        if (math.isfinite(hi) and hi - lo <= 1e-14 * hi) or time.perf_counter() > deadline:
            break
    return best


def _eliminated(net: Network, start: float, budget: float | None) -> MethodOutput:
    """One very wide hidden layer (`lipsdp.eliminate`): the best single multiplier, then per-neuron
    multipliers by L-BFGS with Lanczos eigenvalues on the reduced operator, on the CPU, within the budget."""
    t0 = eliminate.layer_multipliers(net)
    deadline = start + budget if budget is not None else math.inf
    t, evaluations = eliminate.neuron_multipliers(net, t0, deadline)
    note = f"{evaluations} per-neuron bound evaluations in {time.perf_counter() - start:.1f} s from the best single multiplier"
    return verified_output(net, t, float("nan"), "ok", "numpy-lanczos", [note])


def _on_reduced_lmi(net: Network, gone: tuple[int, ...], start: float, budget: float | None,
                    steps: int | None, tol: float) -> MethodOutput:
    """Wide ReLU layers eliminated from the LMI (`lipsdp.reduced`): L-BFGS on log rho*(T) over log t, rho* and
    its gradient from the reduced LMI (`Reduction.rho_gradient`: block Cholesky of the kept blocks, Lanczos
    on the input block, products with the sparse weights; no eliminated layer's block is formed), first with
    one variable per convolution channel for TIED_FRACTION of the budget, then per neuron; on the CPU.
    The same start (the layer-by-layer multipliers at their best scale) and margin as the dense descent;
    `steps` caps the L-BFGS iterations. The best iterate is certified, and the start too should that proof
    come out looser than the start's own bound would be, so the result is never looser than `sequential`."""
    try:
        t_start = reduced.along_ray(net, reduced.sequential_multipliers(net, gone), gone)
    except (np.linalg.LinAlgError, ValueError):  # a singular quadratic form: verified_output falls back
        return verified_output(net, None, float("nan"), "ok", "numpy-lanczos", ["no feasible start"])
    net_m = _with_margin(net)
    red = reduced.Reduction(net_m, gone)
    t0 = t_start * (1.0 - MARGIN)
    first = None
    for _ in range(8):  # the margin may leave the start a hair outside the domain: grow it until inside
        first = red.rho_gradient(t0)
        if first is not None:
            break
        t0 = 2.0 * t0
    if first is None:
        return verified_output(net, t_start, float("nan"), "ok", "numpy-lanczos", ["no feasible start"])
    deadline = start + budget if budget is not None else math.inf
    descent = LogDescent(red.rho_gradient, t0, first, deadline)
    options = {**DESCENT_OPTIONS, "ftol": tol}
    tied = _channel_groups(net)
    tied_steps = 0 if steps is None or tied is None else int(TIED_FRACTION * steps)
    phases = []
    if tied is not None:
        phase_end = start + TIED_FRACTION * budget if budget is not None else math.inf
        descent.run(None if steps is None else tied_steps, tied, phase_end, options)
        phases.append(f"first on one multiplier per channel ({tied[1]} variables), then per neuron")
    descent.run(None if steps is None else max(steps - tied_steps, 0), options=options)
    seconds = time.perf_counter() - start
    notes = [f"{descent.evaluations} bound evaluations on the reduced LMI (L-BFGS, cpu) in {seconds:.1f} s"]
    notes += phases
    raw = math.sqrt(descent.best_rho)
    if descent.best_t is t0:
        return verified_output(net, t_start, float("nan"), "ok", "numpy-lanczos", notes)
    out = verified_output(net, descent.best_t / (1.0 - MARGIN), raw, "ok", "numpy-lanczos", notes)
    if out.upper > raw * (1.0 + 1e-3) or out.upper > math.sqrt(first[0]):
        fallback = verified_output(net, t_start, float("nan"), "ok", "numpy-lanczos", notes)
        if fallback.upper < out.upper:
            return fallback
    return out


def anytime(
    net: Network,
    *,
    budget: float | None = 30.0,
    steps: int | None = None,
    device: str | None = None,
    seed: int = 0,
    tol: float = 1e-12,
    **_: object,
) -> MethodOutput:
    """First-order LipSDP-Neuron within a time `budget` (seconds; None: no time limit) or a number of
    quasi-Newton `steps` (None: no limit). Verified upper bound at any stopping time.

    device: 'cpu', 'cuda', or None for CUDA when available (a net with wide layers eliminated from the LMI,
    `lipsdp.reduced`, descends on the reduced LMI on the CPU; the notes say so). The result is at least as
    tight as the layer-by-layer bound it starts from and approaches the LipSDP-Neuron optimum with more
    budget; it uses the whole budget unless it has converged. `seed` fixes torch's generator (the method itself is
    deterministic). The notes record the steps taken and why it stopped."""
    import torch

    start = time.perf_counter()
    if net.depth == 0:  # one affine map: its norm, proved through the LMI (never looser than `sequential`)
        from lipsdp.methods.sequential import sequential

        return sequential(net)
    gone = reduced.plan(net)
    if gone:  # on the reduced LMI, with the unrolled convolutions kept sparse (CSR)
        return _on_reduced_lmi(net, gone, start, budget, steps, tol)
    net = dense_weights(net)  # the dense descent, and one wide layer's elimination, work on dense weights
    if eliminate.applies(net):
        return _eliminated(net, start, budget)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    bal = Balancing.of(net)
    net_b = bal.network(net)
    net_m = _with_margin(net_b)
    t0 = _feasible_start(net, net_b, net_m, bal)
    if t0 is None:
        return verified_output(net, None, float("nan"), "ok", f"torch-{device}", ["no feasible start"])
    threads = torch.get_num_threads()
    if device == "cpu" and max(net_b.hidden_sizes + [min(net_b.sizes[0], net_b.hidden_sizes[0])]) <= 256:
        torch.set_num_threads(1)  # small blocks: one thread is faster, and robust on a busy machine
    deadline = start + budget if budget is not None else math.inf
    try:
        obj = _Objective(net_m, device)
        s0 = torch.as_tensor(np.log(t0), **obj.kw)
        tied = _channel_groups(net) if TIED_FRACTION > 0.0 else None
        steps_done, tied_note = 0, None
        if tied is not None:
            phase_end = start + TIED_FRACTION * budget if budget is not None else math.inf
            tied_steps = None if steps is None else int(TIED_FRACTION * steps)
            steps_done = _channel_phase(obj, s0, tied, tied_steps, phase_end, tol)
            tied_note = f"the first {steps_done} of them on one multiplier per channel ({tied[1]} variables)"
            s0 = obj.best_s if obj.best_s is not None else s0
        more, reason = _descend(obj, s0, None if steps is None else max(steps - steps_done, 0), deadline, tol)
        steps_done += more
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    log.info("anytime: %d steps, rho %.6g, %.1fs on %s (%s)", steps_done, obj.best_rho, seconds, device, reason)
    notes = [
        (
            f"{steps_done} quasi-Newton steps ({obj.evaluations} bound evaluations) on {device} "
            f"in {seconds:.1f} s; stopped: {reason}"
        )
    ]
    if tied_note is not None:
        notes.append(tied_note)
    start_t = bal.original_multipliers(net, t0 / (1.0 - MARGIN))  # exactly the layer-by-layer multipliers
    if obj.best_s is None:
        return verified_output(net, start_t, float("nan"), "ok", f"torch-{device}", notes)

    def certified_start() -> MethodOutput:
        return verified_output(net, start_t, _raw_bound(bal, obj.start_rho), "ok", f"torch-{device}", notes)

    if obj.best_s is obj.start_s:
        # no step was accepted: the best iterate is the start (up to exp(log t) rounding), so one certificate
        # (on a CNN layer of 4096 neurons a dense certificate takes a minute)
        return certified_start()
    # The best iterate, certified; should its proof fail (then the certificate repairs it, at a cost), the
    # best iterates of the earlier smoothing levels are tried too and the tightest verified bound is kept.
    out = None
    earlier = sorted((c for c in obj.candidates if c[1] is not obj.best_s), key=lambda c: c[0])
    for rho, s in [(obj.best_rho, obj.best_s), *earlier[:FALLBACK_CANDIDATES]]:
        t = bal.original_multipliers(net, torch.exp(s).cpu().numpy() / (1.0 - MARGIN))
        raw = _raw_bound(bal, rho)
        candidate = verified_output(net, t, raw, "ok", f"torch-{device}", notes)
        if out is None or candidate.upper < out.upper:
            out = candidate
        if not candidate.upper > raw * (1.0 + 1e-3):
            break
    if obj.best_rho >= obj.start_rho * (1.0 - 1e-6):
        # no real progress: the start itself (without the margin) may certify a hair tighter, and
        # `sequential` must never be tighter than this method
        candidate = certified_start()
        if candidate.upper < out.upper:
            out = candidate
    return out


def _raw_bound(bal: Balancing, rho_balanced: float) -> float:
    if not math.isfinite(rho_balanced):
        return float("nan")
    with np.errstate(over="ignore", under="ignore"):
        return float(np.sqrt(bal.original_rho(rho_balanced)))


def _with_margin(net: Network) -> Network:
    """The network whose LMI is F(rho, T) - 2 MARGIN diag(0, T) in the multipliers t' = (1 - MARGIN) t.

    Per neuron, 2t((1 - d) x^2 - (a + b) x y + a b y^2) = 2t' (x - a'y)(x - b'y) with a' + b' = (a + b)/(1 - d)
    and a'b' = ab/(1 - d): the same LMI formulas with the slopes [a', b'] (slightly wider). So any t' the
    optimiser finds for this network gives multipliers t = t'/(1 - d) for the real one with
    F(rho, T) >= 2d diag(0, T): a relative margin on the hidden block that the certificate's rounding
    analysis can resolve. Without it, deep nets drift to where R(T) is singular to 1e-11 (rho* stays finite
    there) and no floating-point proof goes through. It costs about d times the depth in the bound."""
    d = MARGIN
    alphas, betas = [], []
    for a, b in zip(net.alphas, net.betas):
        root = np.sqrt((a - b) ** 2 + 4.0 * d * a * b)
        alphas.append(np.minimum((a + b - root) / (2.0 * (1.0 - d)), a))
        betas.append(np.maximum((a + b + root) / (2.0 * (1.0 - d)), b))
    return net.with_slopes(alphas, betas)


def _feasible_start(net: Network, net_b: Network, net_m: Network, bal: Balancing) -> np.ndarray | None:
    """Multipliers t' for the margin network `net_m`: the balanced layer-by-layer multipliers at their best
    scale (`reduced.along_ray`; the better of those of the net and of the balanced net) times (1 - MARGIN),
    doubled if needed until the hidden block is positive definite."""
    best, best_rho = None, math.inf
    for make in (
        lambda: bal.multipliers(net, reduced.along_ray(net, sequential_multipliers(net))),
        lambda: reduced.along_ray(net_b, sequential_multipliers(net_b)),
    ):
        try:
            with np.errstate(all="ignore"):
                t = np.asarray(make(), dtype=np.float64) * (1.0 - MARGIN)
        except (np.linalg.LinAlgError, ValueError, ArithmeticError):  # e.g. tau**2 overflows on raw weights
            continue
        if t.size != net_b.n_neurons or not np.all(np.isfinite(t)) or not np.all(t > 0):
            continue
        for _ in range(64):
            rho = schur_rho(net_m, t)
            if rho is not None:
                break
            t = 2.0 * t
        if rho is not None and rho < best_rho:
            best, best_rho = t, rho
    return best


def _channel_phase(obj: _Objective, s0, tied: tuple[np.ndarray, int], steps: int | None, deadline: float,
                   tol: float) -> int:
    """The descent on one multiplier per channel (`_Tied`) from s0; its best point, candidates and start are
    recorded in `obj` in full coordinates. Returns the steps taken."""
    groups, n_groups = tied
    sub = _Tied(obj, s0, obj.torch.as_tensor(groups, device=s0.device), n_groups)
    done, _ = _descend(sub, obj.torch.zeros(n_groups, **obj.kw), steps, deadline, tol)
    obj.candidates.extend((rho, sub.full(x)) for rho, x in sub.candidates)
    if sub.start_s is not None:  # the start is obj's best point itself until a step improved on it
        obj.start_rho = sub.start_rho
        obj.start_s = obj.best_s if sub.best_s is sub.start_s else sub.full(sub.start_s)
    log.info("anytime: %d tied steps over %d channel groups, rho %.6g", done, n_groups, obj.best_rho)
    return done


def _descend(obj: _Objective, x, steps: int | None, deadline: float, tol: float) -> tuple[int, str]:
    """BFGS with smoothing and barrier continuation (module docstring). Returns the steps taken and why it
    stopped; the best iterate is in obj.best_s / obj.best_rho, the best of each level in obj.candidates."""
    pt = obj.point(x)
    if pt is None:
        return 0, "start point outside the domain"
    obj.accept(pt)
    if obj.start_s is None:  # the same object as the best point until a step improves on it
        obj.start_s, obj.start_rho = obj.best_s, pt.rho
    qn = _QuasiNewton(x.numel(), obj.kw)
    mu_rel = MU_START
    mu, eps = mu_rel * obj.best_rho, _barrier(mu_rel)
    phi, g = obj.smoothed(pt, mu, eps), obj.gradient(pt, mu, eps)
    history = [phi]
    next_hessian = 0  # evaluation count at which the exact Hessian is due
    level_start_rho = obj.best_rho
    idle_restarts = 0
    done = 0

    def restart(from_best: bool) -> None:
        """Recompute the objective at the current point (new level), or go to the best point seen when
        that is lower at the current level."""
        nonlocal x, pt, phi, g, history
        phi = obj.smoothed(pt, mu, eps)
        if from_best and obj.best_s is not x:
            best = obj.point(obj.best_s)
            best_phi = obj.smoothed(best, mu, eps)
            if best_phi < phi:
                x, pt, phi = obj.best_s, best, best_phi
        g = obj.gradient(pt, mu, eps)
        history = [phi]

    while True:
        if obj.best_rho <= 0.0:
            return done, "the bound is zero"
        if steps is not None and done >= steps:
            return done, f"step limit ({steps})"
        if time.perf_counter() > deadline:
            return done, "time budget used"
        done += 1
        if done % 200 == 0:
            log.debug("anytime: step %d, %d evaluations, best rho %.10g", done, obj.evaluations, obj.best_rho)
        found = None
        level_done = False
        if (
            qn.dense and obj.exact_hessian and mu > 0.0 and obj.evaluations >= next_hessian
            and obj.hessian_cost(pt, mu) <= HESSIAN_MAX_COST
        ):
            # exact curvature, as often as its (modelled, so deterministic) cost is a fixed share of the work;
            # its Newton step replaces the quasi-Newton model only where the full step is accepted
            hess, _ = obj.hessian(pt, mu, eps)
            next_hessian = obj.evaluations + HESSIAN_REFRESH * obj.hessian_cost(pt, mu)
            newton = _QuasiNewton(x.numel(), obj.kw)
            if newton.set_hessian(hess):
                step = _clipped(newton.direction(g))
                if -float(g @ step) < DECREMENT * mu_rel:
                    level_done = True  # the Newton model predicts no decrease worth this smoothing level
                else:
                    found = _line_search(obj, x, phi, g, step, mu, eps, deadline)
                    if found is not None and found[3] and found[4] == 1.0:
                        qn = newton
                    else:  # the model was poor along its step: keep the quasi-Newton one, and its step if better
                        other = _line_search(obj, x, phi, g, _clipped(qn.direction(g)), mu, eps, deadline)
                        if found is None or (other is not None and other[1] < found[1]):
                            found = other
        if found is None and not level_done:
            step = _clipped(qn.direction(g))
            if -float(g @ step) > 1e-14 * (1.0 + abs(phi)):  # else no decrease is resolvable in floating point
                found = _line_search(obj, x, phi, g, step, mu, eps, deadline)
        if level_done:
            pass
        elif found is None:
            if qn.fresh:
                level_done = True  # not even a steepest-descent step decreases the smoothed objective
            else:  # a poor quasi-Newton model: start it afresh here
                qn.reset()
                continue
        else:
            pt, phi_new, g_new, wolfe, _ = found
            obj.accept(pt)
            qn.update(pt.s - x, g_new - g)
            if not wolfe:
                qn.reset()
            x, phi, g = pt.s, phi_new, g_new
            history.append(phi)
            if len(history) > WINDOW and history[-WINDOW - 1] - phi < WINDOW_FRACTION * mu_rel:
                level_done = True
        if level_done:
            log.debug(
                "anytime: step %d, %d evaluations, mu %.0e rho, best rho %.10g",
                done, obj.evaluations, mu_rel, obj.best_rho,
            )
            obj.candidates.append((obj.best_rho, obj.best_s))
            if mu_rel > MU_FINEST:
                mu_rel = max(mu_rel * MU_FACTOR, MU_FINEST)
            else:
                idle_restarts = idle_restarts + 1 if obj.best_rho >= level_start_rho * (1.0 - tol) else 0
                if idle_restarts >= CONVERGED_RESTARTS:
                    return done, f"converged (no decrease over {CONVERGED_RESTARTS} restarts)"
                qn.reset()
            level_start_rho = obj.best_rho
            mu, eps = mu_rel * obj.best_rho, _barrier(mu_rel)
            restart(from_best=True)


def _clipped(direction):
    """A direction scaled down to change no multiplier by more than a factor e^MAX_STEP at the unit step."""
    import torch

    largest = float(torch.max(torch.abs(direction)))
    return direction * (MAX_STEP / largest) if largest > MAX_STEP else direction


def _barrier(mu_rel: float) -> float:
    """Weight of the barrier -log det R at a smoothing level: it keeps the iterates as far inside the domain
    as the certificate needs to prove them, and costs at most about eps * (number of neurons) in log rho."""
    return max(BARRIER * mu_rel, BARRIER_MIN)
