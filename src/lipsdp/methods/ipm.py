"""A primal-dual interior-point solver specialised to the LipSDP inequality (no CVXPY, no conic solver).

The general-purpose conic solvers pay for the LMI as an unstructured PSD cone (Clarabel's cost grows
with the square of the cone's vectorised size). Here every multiplier's matrix has rank <= 2:

    F(rho, t) = rho E_0 + sum_i t_i U_i G_i U_i' - W_l' W_l,     G_i = [[2 a b, -(a + b)], [-(a + b), 2]],

with U_i = [w_i, e_i] (the neuron's incoming weight row and its unit vector), so the Schur-complement
matrix of each Newton step, H_ij = tr(A_i X A_j Z^-1), comes from two dense products U'XU and U'Z^-1U
in O(n^2 K + n K^2) flops (n = LMI size, K = n_0 + 2 * neurons) instead of O(n^4). The method is the
standard infeasible primal-dual path-following scheme with the HKM search direction and Mehrotra's
predictor-corrector (Helmberg, Rendl, Vanderbei & Wolkowicz 1996; Todd, Toh & Tutuncu 1998).

It returns the multipliers; the bound reported to the user is always re-derived and proved by
`lipsdp.certificate`. Layer mode ties the multipliers of each layer together (LipSDP-Layer).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg as sla

from lipsdp.lmi import (
    Balancing,
    BlockCholesky,
    BlockTridiagonal,
    negated_lmi,
    schur_rho,
    sequential_multipliers,
)
from lipsdp.network import Network

log = logging.getLogger(__name__)


@dataclass
class IPMResult:
    multipliers: np.ndarray  # one per hidden neuron (layer mode: repeated per layer)
    rho: float
    status: str
    iterations: int
    gap: float
    seconds: float
    rho_lower: float | None = None  # proven lower bound on the LMI's optimal rho (from the dual iterate)


class _Structure:
    """The data of min rho s.t. F(rho, t) >= 0, t >= 0, in the form Z = C - sum_i y_i A_i, A_i = -U G_i U',
    C = -W_l'W_l on the last block; every product with U and G by dense blocks and slices."""

    def __init__(self, net: Network, per_neuron: bool):
        sizes = net.sizes[:-1]
        offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        n0 = sizes[0]
        # U = [I_0 | weight columns of every neuron | unit columns of every neuron], kept as dense blocks
        # for BLAS products: (rows of block k-1, W_{k-1}, its weight columns, rows of block k, its unit
        # columns) per hidden layer. All weight columns (and all unit columns) are contiguous, so G and D
        # act on two slices at once.
        n_hidden = net.n_neurons
        self.blocks = []
        col = n0
        for k in range(net.depth):
            nk = net.weights[k].shape[0]
            self.blocks.append(
                (
                    slice(offs[k], offs[k + 1]),
                    net.weights[k],
                    slice(col, col + nk),
                    slice(offs[k + 1], offs[k + 2]),
                    slice(n_hidden + col, n_hidden + col + nk),
                )
            )
            col += nk
        self.w_cols = slice(n0, n0 + n_hidden)
        self.e_cols = slice(n0 + n_hidden, n0 + 2 * n_hidden)
        self.n0 = n0
        self.k = n0 + 2 * n_hidden
        self.m = 1 + (net.n_neurons if per_neuron else net.depth)
        self.n = int(offs[-1])
        self.n_lin = self.m - 1
        self.b = np.zeros(self.m)
        self.b[0] = -1.0  # maximise -rho
        self.layer_sizes = net.hidden_sizes
        self.net = net
        self.per_neuron = per_neuron
        self.ab2 = [2.0 * a * b for a, b in zip(net.alphas, net.betas)]
        self.apb = [a + b for a, b in zip(net.alphas, net.betas)]
        self.ab2_all = np.concatenate(self.ab2) if self.ab2 else np.zeros(0)
        self.apb_all = np.concatenate(self.apb) if self.apb else np.zeros(0)
        self.last = slice(int(offs[-2]), int(offs[-1]))

    def primal_objective(self, x_mat: np.ndarray) -> float:
        """<C, X> with C = -W_l'W_l on the last block."""
        wl = self.net.weights[-1]
        return -float(np.sum((wl @ x_mat[self.last, self.last]) * wl))

    def slack(self, y: np.ndarray) -> BlockTridiagonal:
        """Z = C - A'(y) = F(rho, t), block-tridiagonal (never formed densely)."""
        return negated_lmi(self.net, float(y[0]), self.expanded(y))

    def adjoint_blocks(self, y: np.ndarray) -> BlockTridiagonal:
        """-sum_i y_i A_i = F(y_0, y_1..) - F(0, 0): the linear part of the LMI, block-tridiagonal."""
        f = negated_lmi(self.net, float(y[0]), self.expanded(y))
        wl = self.net.weights[-1]
        f.diag[-1] = f.diag[-1] + wl.T @ wl
        return f

    def times_u(self, m: np.ndarray) -> np.ndarray:
        """M U for a dense M, by dense blocks (BLAS): U = [I_0 | per layer: W_{k-1}' rows, unit columns]."""
        out = np.empty((m.shape[0], self.k))
        out[:, : self.n0] = m[:, : self.n0]
        for rows_prev, w, cols_w, rows_k, cols_e in self.blocks:
            out[:, cols_w] = m[:, rows_prev] @ w.T
            out[:, cols_e] = m[:, rows_k]
        return out

    def ut_times(self, y: np.ndarray) -> np.ndarray:
        """U' Y for a dense Y, by dense blocks (BLAS)."""
        out = np.empty((self.k, y.shape[1]))
        out[: self.n0] = y[: self.n0]
        for rows_prev, w, cols_w, rows_k, cols_e in self.blocks:
            out[cols_w] = w @ y[rows_prev]
            out[cols_e] = y[rows_k]
        return out

    # A(M)_i = <A_i, M> for M = M1 M2, given Y1 = M1' U (or None for M1 = I) and Y2 = M2 U.
    def a_bilinear(self, y1: np.ndarray | None, y2: np.ndarray) -> np.ndarray:
        """-(U_i' M U_i : G_i) per variable, from column-wise dot products on the dense blocks of U
        (slices, no gathered copies)."""
        n0 = self.n0
        out = np.zeros(self.m)
        out[0] = -(float(np.trace(y2[:n0, :n0])) if y1 is None else float(np.einsum("rj,rj->", y1[:, :n0], y2[:, :n0])))
        var = 1
        for k, (rows_prev, w, cols_w, rows_k, cols_e) in enumerate(self.blocks):
            if y1 is None:  # columns of U: W_{k-1}' on the previous block, unit vectors on block k
                d_ww = np.einsum("ir,ri->i", w, y2[rows_prev, cols_w])
                d_we = np.einsum("ir,ri->i", w, y2[rows_prev, cols_e])
                d_ew = np.diagonal(y2[rows_k, cols_w])
                d_ee = np.diagonal(y2[rows_k, cols_e])
            else:
                d_ww = np.einsum("rj,rj->j", y1[:, cols_w], y2[:, cols_w])
                d_we = np.einsum("rj,rj->j", y1[:, cols_w], y2[:, cols_e])
                d_ew = np.einsum("rj,rj->j", y1[:, cols_e], y2[:, cols_w])
                d_ee = np.einsum("rj,rj->j", y1[:, cols_e], y2[:, cols_e])
            ab2, apb = self.ab2[k], self.apb[k]
            vals = -(ab2 * d_ww - apb * (d_we + d_ew) + 2.0 * d_ee)
            if self.per_neuron:
                out[var : var + len(vals)] = vals
                var += len(vals)
            else:
                out[var] = float(np.sum(vals))
                var += 1
        return out

    def expanded(self, y: np.ndarray) -> np.ndarray:
        """The multiplier part of y, one entry per hidden neuron (layer mode: repeated over the layer)."""
        return y[1:] if self.per_neuron else np.repeat(y[1:], self.layer_sizes)

    def g_rows(self, m: np.ndarray) -> np.ndarray:
        """G M: each neuron's 2x2 block G_i applied to its (weight, unit) pair of rows."""
        w, e = self.w_cols, self.e_cols
        ab2, apb = self.ab2_all[:, None], self.apb_all[:, None]
        out = np.empty_like(m)
        out[: self.n0] = m[: self.n0]
        _combine_pairs(m[w], m[e], (ab2, -apb, -apb, 2.0), out[w], out[e], per_row=True)
        return out

    def g_cols(self, m: np.ndarray) -> np.ndarray:
        """M G: each neuron's 2x2 block G_i applied to its (weight, unit) pair of columns."""
        w, e = self.w_cols, self.e_cols
        out = np.empty_like(m)
        out[:, : self.n0] = m[:, : self.n0]
        _combine_pairs(m[:, w], m[:, e], (self.ab2_all, -self.apb_all, -self.apb_all, 2.0), out[:, w], out[:, e], per_row=False)
        return out

    def _sum_groups(self, m: np.ndarray) -> np.ndarray:
        """S' M: rows summed into their variable (rho; one neuron's two columns; or a whole layer)."""
        out = np.empty((self.m,) + m.shape[1:])
        out[0] = m[: self.n0].sum(axis=0)
        var = 1
        for _, _, cols_w, _, cols_e in self.blocks:
            pair = m[cols_w] + m[cols_e]
            if self.per_neuron:
                out[var : var + len(pair)] = pair
                var += len(pair)
            else:
                out[var] = pair.sum(axis=0)
                var += 1
        return out

    def schur(self, xu: np.ndarray, ziu: np.ndarray) -> np.ndarray:
        """H_ij = tr(A_i X A_j Z^-1) summed into variables, from G U'XU G and Q = U'Z^-1U."""
        q_mat = self.ut_times(ziu)
        pg = self.g_rows(self.ut_times(self.g_cols(xu)))  # G U' X U G (G applied on the n x K side)
        pg *= q_mat
        h = self._sum_groups(self._sum_groups(pg).T)
        return 0.5 * (h + h.T)


@dataclass
class _Iterate:
    """The quantities of one interior-point iteration that the predictor and corrector share."""

    st: _Structure
    x_mat: np.ndarray
    x_lin: np.ndarray
    z_lin: np.ndarray
    z_chol: BlockCholesky  # Z = L L', L block-bidiagonal
    xu: np.ndarray  # X U
    ziu: np.ndarray  # Z^-1 U
    chol_h: tuple
    r_p: np.ndarray
    a_x: np.ndarray
    a_zinv: np.ndarray
    mu: float

    def direction(self, sigma: float, corr_x=None, corr_dz=None, corr_lin=None):
        """HKM Newton direction towards sigma * mu (Mehrotra's second-order term when corr_* given:
        the predictor's dX, its dZ and its dx_lin dz_lin / z_lin).

        With zero dual residual: A(dX) = r_p, dZ = -A'(dy), dX = sigma mu Z^-1 - X - X dZ Z^-1 [- corr].
        Every dZ is block-tridiagonal, so its products with dense matrices are block products (faster than
        going through U D U': measured on deep and on wide nets), and Z^-1 is applied by block solves with
        Z's block-bidiagonal factor: O(n^2 w) per direction instead of O(n^3)."""
        st, mu = self.st, self.mu
        rhs = self.r_p - (sigma * mu * self.a_zinv - self.a_x)
        lin_part = sigma * mu / self.z_lin - self.x_lin
        if corr_x is not None:
            # <A_i, dX_aff dZ_aff Z^-1> from dX_aff U and dZ_aff (Z^-1 U)
            rhs = rhs + st.a_bilinear(st.times_u(corr_x), corr_dz.matvec(self.ziu))
            lin_part = lin_part - corr_lin
        rhs[1:] += lin_part  # A_lin(x) = -x on the multiplier rows
        dy = sla.cho_solve(self.chol_h, rhs, check_finite=False)
        dz_lin = dy[1:]
        dz = st.adjoint_blocks(dy)
        # (X dZ [+ dX_aff dZ_aff] - sigma mu I)' = dZ X [+ dZ_aff dX_aff] - sigma mu I (X, dX symmetric)
        rhs_t = dz.matvec(self.x_mat)
        if corr_x is not None:
            rhs_t += corr_dz.matvec(corr_x)
        rhs_t[np.diag_indices_from(rhs_t)] -= sigma * mu
        dx = self.z_chol.solve(rhs_t).T
        dx += self.x_mat
        dx = -0.5 * (dx + dx.T)
        dx_lin = sigma * mu / self.z_lin - self.x_lin - self.x_lin * dz_lin / self.z_lin
        if corr_lin is not None:
            dx_lin = dx_lin - corr_lin
        return dx, dx_lin, dy, dz, dz_lin


def _combine_pairs(a: np.ndarray, b: np.ndarray, coeffs: tuple, out_a: np.ndarray, out_b: np.ndarray, per_row: bool) -> None:
    """out_a = c_aa a + c_ab b, out_b = c_ba a + c_bb b, elementwise with coefficients broadcast over the
    columns (per_row=False: one per column) or sliced with the rows (per_row=True: one per row), in chunks
    of rows small enough that every temporary stays in cache (these products are memory-bound)."""
    step = max(1, (1 << 15) // max(1, a.shape[1]))
    for i in range(0, a.shape[0], step):
        rows = slice(i, i + step)
        c_aa, c_ab, c_ba, c_bb = (c[rows] if per_row and np.ndim(c) else c for c in coeffs)
        a_i, b_i = a[rows], b[rows]
        np.multiply(a_i, c_aa, out=out_a[rows])
        out_a[rows] += b_i * c_ab
        np.multiply(b_i, c_bb, out=out_b[rows])
        out_b[rows] += a_i * c_ba


def _cholesky_lower(a: np.ndarray) -> np.ndarray | None:
    """The lower Cholesky factor of a, or None when a is not (numerically) positive definite."""
    try:
        return np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return None


def _max_step(lower: np.ndarray, dx: np.ndarray, warm: dict | None = None) -> float:
    """Largest alpha with X + alpha dX PSD, given the Cholesky factor of X: -1 / lambda_min(L^-1 dX L^-T),
    the eigenvalue by Lanczos on the implicit operator (O(n^2) per product instead of O(n^3))."""

    def apply(v: np.ndarray) -> np.ndarray:
        w = sla.solve_triangular(lower, v, lower=True, trans="T", check_finite=False)
        return sla.solve_triangular(lower, dx @ w, lower=True, check_finite=False)

    def dense_min() -> float:
        tmp = sla.solve_triangular(lower, dx, lower=True, check_finite=False)
        m = sla.solve_triangular(lower, tmp.T, lower=True, check_finite=False)
        return sla.eigvalsh(0.5 * (m + m.T), subset_by_index=[0, 0], check_finite=False)[0]

    return _step_from(_smallest_eigenvalue(dx.shape[0], apply, dense_min, warm))


def _max_step_slack(chol: BlockCholesky, z: BlockTridiagonal, dz: BlockTridiagonal, warm: dict | None = None) -> float:
    """Largest alpha with Z + alpha dZ PSD for block-tridiagonal Z = L L' and dZ: the same eigenvalue, each
    product by block solves and a block-tridiagonal product (O(n w), not O(n^2))."""

    def apply(v: np.ndarray) -> np.ndarray:
        return chol.solve_lower(dz.matvec(chol.solve_upper(v)))

    def dense_min() -> float:
        return sla.eigvalsh(dz.dense(), z.dense(), subset_by_index=[0, 0], check_finite=False)[0]

    return _step_from(_smallest_eigenvalue(z.size, apply, dense_min, warm))


def _smallest_eigenvalue(n: int, apply, dense_min, warm: dict | None = None) -> float:
    """lambda_min of a symmetric operator: dense for small n, else Lanczos (dense when it fails). `warm`
    keeps the last eigenvector ('v') as the next start: successive step lengths of one side are close."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    if n <= 200:
        return float(dense_min())
    op = LinearOperator((n, n), matvec=apply, dtype=np.float64)
    v0 = None if warm is None else warm.get("v")
    if v0 is None:  # a fixed start (ARPACK's own is random): the same run gives the same steps
        v0 = 1.0 + 1e-3 * np.cos(np.arange(n))
    try:
        vals, vecs = eigsh(op, k=1, which="SA", tol=1e-3, maxiter=2000, v0=v0, ncv=8)
    except ArpackNoConvergence:
        return float(dense_min())
    if warm is not None and np.all(np.isfinite(vecs)):
        warm["v"] = vecs[:, 0]
    return float(vals[0])


def _step_from(lam: float) -> float:
    return np.inf if lam >= 0 else -1.0 / lam


def _max_step_lin(x: np.ndarray, dx: np.ndarray) -> float:
    neg = dx < 0
    return float(np.min(-x[neg] / dx[neg])) if np.any(neg) else np.inf


def solve_lipsdp_ipm(
    net: Network,
    *,
    per_neuron: bool = True,
    tol: float = 1e-7,
    max_iter: int = 100,
    time_limit: float | None = None,
    restarts: int = 2,
) -> IPMResult:
    """Solve min rho s.t. F(rho, t) >= 0, t >= 0 to relative gap `tol`. Returns unverified multipliers,
    and a proven lower bound on the optimum from the final primal (dual-matrix) iterate.

    The LMI is first balanced by an exact power-of-two diagonal congruence (`lmi.Balancing`: every neuron
    and every layer its own factor, and the output scaled so that rho is about 1), which keeps trained and
    ill-conditioned networks well conditioned; the answer is mapped back. When a run stalls (or breaks
    down) it is restarted from its best multipliers, re-balanced so that F is equilibrated there.
    """
    start = time.perf_counter()
    original = net
    net, lift = _reduce_input(net)
    bal = Balancing.of(net, per_neuron=per_neuron)
    try:
        bal = bal.normalising_rho(_estimate_rho(bal.network(net)))
    except (np.linalg.LinAlgError, ValueError):
        pass
    best: IPMResult | None = None
    warm = None
    for attempt in range(restarts + 1):
        net_b = bal.network(net)
        remaining = None if time_limit is None else max(time_limit - (time.perf_counter() - start), 0.0)
        try:
            res, x_mat = _solve_balanced(
                net_b, per_neuron, tol, max_iter, remaining, time.perf_counter(), warm
            )
        except (np.linalg.LinAlgError, ValueError) as exc:
            # Numerical breakdown (e.g. a factorisation of a nearly singular iterate): the caller falls
            # back to other verified multipliers.
            log.info("interior point broke down: %s", exc)
            res, x_mat = IPMResult(np.zeros(net.n_neurons), float("nan"), "numerical_error", 0, float("inf"), 0.0), None
        if x_mat is not None:
            res.rho_lower = _proven_lower(original, bal, x_mat, lift, per_neuron)
        if np.isfinite(res.rho):
            res.multipliers = bal.original_multipliers(net, res.multipliers)
            res.rho = bal.original_rho(res.rho)
        res.iterations += best.iterations if best is not None else 0
        best = res if best is None or _better(res, best) else _merge_lower(best, res)
        if best.status in ("optimal", "time_limit") or attempt == restarts:
            break
        if time_limit is not None and time.perf_counter() - start > time_limit:
            best.status = "time_limit"
            break
        if not np.isfinite(best.rho):
            break
        # restart from the best multipliers, balanced so that F is equilibrated there
        log.info("interior point %s at rho=%.10g; restarting (%d)", res.status, best.rho, attempt + 1)
        bal = Balancing.equilibrating(net, best.rho, best.multipliers, per_neuron=per_neuron)
        bal = bal.normalising_rho(bal.balanced_rho(best.rho))
        warm = bal.multipliers(net, best.multipliers)
        best.status = res.status
    best.seconds = time.perf_counter() - start
    return best


def _reduce_input(net: Network) -> tuple[Network, np.ndarray | None]:
    """When the input is wider than the first hidden layer (n_0 > n_1, e.g. 784-pixel images), replace
    W_0 = R' Q' (thin QR, Q with orthonormal columns) by the square R'. The LMI of the reduced network has
    the same optimum: congruence with [Q, Q_perp] on the input block leaves rho I on the complement,
    decoupled from everything else. The multipliers are the same variables, so they are certified on the
    original network (the QR is not exact); the LMI shrinks by n_0 - n_1. Returns the net and Q (or None)."""
    w0 = net.weights[0]
    if net.depth == 0 or w0.shape[1] <= w0.shape[0]:
        return net, None
    q, r = np.linalg.qr(w0.T, mode="reduced")
    return replace(net, weights=(np.ascontiguousarray(r.T),) + tuple(net.weights[1:])), q


def _proven_lower(
    net: Network, bal: Balancing, x_mat: np.ndarray, lift: np.ndarray | None, per_neuron: bool
) -> float | None:
    """Proven lower bound on the optimal rho of `net` from the balanced (possibly input-reduced) dual
    matrix: its factor, lifted back to the full input space, is a dual point of the balanced original."""
    from lipsdp.dual import factor, lower_bound_rho

    v = factor(x_mat)
    if v is None:
        return None
    if lift is not None:
        n1 = lift.shape[1]
        v = np.vstack([lift @ v[:n1], v[n1:]])
    if not bal.is_exact(net):
        return None
    lower_b = lower_bound_rho(bal.network(net), v, tied=not per_neuron)
    return bal.original_rho(lower_b) if lower_b is not None else None


def _estimate_rho(net: Network) -> float:
    t = sequential_multipliers(net)
    return schur_rho(net, t) or float("nan")


def _better(a: IPMResult, b: IPMResult) -> bool:
    """a is a better answer than b (a lower rho; lower bounds are kept separately)."""
    if not np.isfinite(a.rho):
        return False
    if not np.isfinite(b.rho):
        return True
    better = a.rho <= b.rho
    if better:
        _merge_lower(a, b)
    return better


def _merge_lower(keep: IPMResult, other: IPMResult) -> IPMResult:
    """Keep the larger of two proven lower bounds on the optimum."""
    lows = [x for x in (keep.rho_lower, other.rho_lower) if x is not None]
    keep.rho_lower = max(lows) if lows else None
    return keep


def _solve_balanced(
    net: Network,
    per_neuron: bool,
    tol: float,
    max_iter: int,
    time_limit: float | None,
    start: float,
    warm: np.ndarray | None = None,
) -> tuple[IPMResult, np.ndarray | None]:
    st = _Structure(net, per_neuron)
    n, m, nl = st.n, st.m, st.n_lin
    # Dual-feasible start from the layer-by-layer multipliers: Z = C - A'(y) stays exactly equal to
    # F(rho, t) at every iterate (recomputed, never updated), so every iterate is a valid certificate.
    t0 = sequential_multipliers(net) if warm is None else np.asarray(warm, dtype=np.float64)
    if not per_neuron:
        t0 = np.array([seg[0] for seg in np.split(t0, np.cumsum(net.hidden_sizes)[:-1])])
    t0 = np.maximum(t0, 1e-12 * max(1.0, float(np.max(t0, initial=0.0))))
    rho0 = (schur_rho(net, np.repeat(t0, net.hidden_sizes) if not per_neuron else t0) or 1.0) * 1.1 + 1e-6
    y = np.concatenate([[rho0], t0])
    for _ in range(60):
        z_mat = st.slack(y)
        lz = z_mat.cholesky()
        if lz is not None:
            break
        y[0] *= 2.0
    else:
        return IPMResult(np.zeros(net.n_neurons), float("nan"), "no_feasible_start", 0, float("inf"), 0.0), None
    z_lin = y[1:].copy()
    xi = max(10.0, np.sqrt(n))
    x_mat = xi * np.eye(n)
    lx = np.sqrt(xi) * np.eye(n)
    x_lin = xi * np.ones(nl)
    n_total = n + nl
    status = "max_iterations"
    gap = np.inf
    history: list[float] = []
    warm_x: dict = {}  # the step lengths' last eigenvectors (Lanczos starts)
    warm_z: dict = {}
    it = 0
    for it in range(1, max_iter + 1):
        try:
            # lx, lz: the Cholesky factors of X and Z, kept from the step that accepted them
            xu = st.times_u(x_mat)
            ziu = st.times_u(lz.inverse())
            # residuals
            a_x = st.a_bilinear(None, xu)  # A(X)
            r_p = st.b - a_x.copy()
            r_p[1:] += x_lin  # A_lin(x) = -x on the multiplier rows
            # Z is recomputed from y at every step, so the dual residual is zero up to rounding.
            mu = (z_mat.inner(x_mat) + float(x_lin @ z_lin)) / n_total
            pobj = st.primal_objective(x_mat)
            dobj = float(st.b @ y)
            gap = abs(pobj - dobj) / (1.0 + abs(pobj) + abs(dobj))
            p_inf = np.linalg.norm(r_p) / (1.0 + np.linalg.norm(st.b))
            log.debug("ipm it %d: rho=%.10g gap=%.2e pinf=%.2e", it, y[0], gap, p_inf)
            if gap < tol and p_inf < tol:
                status = "optimal"
                break
            history.append(float(y[0]))
            if len(history) > 15 and history[-16] - history[-1] <= tol * abs(history[-1]):
                status = "stalled"  # rho (a valid bound at every iterate) no longer moves
                break
            if time_limit is not None and time.perf_counter() - start > time_limit:
                status = "time_limit"
                break
            h = st.schur(xu, ziu)
            h[1:, 1:] += np.diag(x_lin / z_lin)
            try:
                chol_h = sla.cho_factor(h, lower=True, check_finite=False)
            except np.linalg.LinAlgError:
                h += np.eye(m) * 1e-12 * np.max(np.abs(np.diag(h)))
                try:
                    chol_h = sla.cho_factor(h, lower=True, check_finite=False)
                except np.linalg.LinAlgError:
                    status = "numerical_error"
                    break
            it_data = _Iterate(
                st, x_mat, x_lin, z_lin, lz, xu, ziu, chol_h, r_p, a_x, st.a_bilinear(None, ziu), mu
            )
            dx, dx_lin, dy, dz, dz_lin = it_data.direction(0.0)
            ap = min(1.0, _max_step(lx, dx, warm_x), _max_step_lin(x_lin, dx_lin))
            ad = min(1.0, _max_step_slack(lz, z_mat, dz, warm_z), _max_step_lin(z_lin, dz_lin))
            mu_aff = (
                z_mat.inner(x_mat + ap * dx)
                + ad * (dz.inner(x_mat) + ap * dz.inner(dx))
                + float((x_lin + ap * dx_lin) @ (z_lin + ad * dz_lin))
            ) / n_total
            sigma = min(1.0, max(0.0, (mu_aff / mu) ** 3))
            dx, dx_lin, dy, dz, dz_lin = it_data.direction(sigma, dx, dz, dx_lin * dz_lin / z_lin)
            gamma = 0.9 + 0.09 * min(ap, ad)
            ap = min(1.0, gamma * _max_step(lx, dx, warm_x), gamma * _max_step_lin(x_lin, dx_lin))
            ad = min(1.0, gamma * _max_step_slack(lz, z_mat, dz, warm_z), gamma * _max_step_lin(z_lin, dz_lin))
            for _ in range(30):
                x_new = x_mat + ap * dx  # exactly symmetric: X and dX are
                lx_new = _cholesky_lower(x_new)
                if lx_new is not None:
                    break
                ap *= 0.5
            else:
                status = "stalled"
                break
            x_mat, lx = x_new, lx_new
            x_lin = x_lin + ap * dx_lin
            for _ in range(30):
                y_new = y + ad * dy
                z_new = st.slack(y_new)
                lz_new = z_new.cholesky() if np.all(y_new[1:] > 0) else None
                if lz_new is not None:
                    break
                ad *= 0.5
            else:
                status = "stalled"
                break
            y, z_mat, z_lin, lz = y_new, z_new, y_new[1:].copy(), lz_new
        except (np.linalg.LinAlgError, ValueError):
            status = "numerical_error"  # the last accepted y is still dual feasible
            break

    mult = np.clip(y[1:], 0.0, None)
    if not per_neuron:
        mult = np.repeat(mult, st.layer_sizes)
    return IPMResult(mult, float(y[0]), status, it, float(gap), time.perf_counter() - start), x_mat
