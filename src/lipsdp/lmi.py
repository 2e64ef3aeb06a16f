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

import math
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lipsdp.network import Network
from lipsdp.weights import all_finite, dense, gram


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

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([d.shape[0] for d in self.diag])]).astype(int)

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """self @ v for a vector or a matrix of columns, block by block (O(n w) per column)."""
        o = self.offsets
        out = np.empty_like(v, dtype=np.float64)
        for k, d in enumerate(self.diag):
            out[o[k] : o[k + 1]] = d @ v[o[k] : o[k + 1]]
        for k, u in enumerate(self.upper):
            out[o[k] : o[k + 1]] += u @ v[o[k + 1] : o[k + 2]]
            out[o[k + 1] : o[k + 2]] += u.T @ v[o[k] : o[k + 1]]
        return out

    def inner(self, m: np.ndarray) -> float:
        """<self, m> for a dense symmetric m (only m's entries on the block pattern are read)."""
        o = self.offsets
        total = sum(float(np.sum(d * m[o[k] : o[k + 1], o[k] : o[k + 1]])) for k, d in enumerate(self.diag))
        total += 2.0 * sum(float(np.sum(u * m[o[k] : o[k + 1], o[k + 1] : o[k + 2]])) for k, u in enumerate(self.upper))
        return total

    def cholesky(self, shift: float = 0.0) -> BlockCholesky | None:
        """The factor of self - shift I = L L' (L block lower-bidiagonal: no fill-in), or None when a block's
        factorisation breaks (the matrix is not numerically positive definite). Cost O(sum n_k^3), the
        same arithmetic as a dense Cholesky that skips the structural zeros."""
        lowers, subs = [], []
        for k, d in enumerate(self.diag):
            a = add_to_diagonal(d.copy(), -shift) if shift else d
            if k > 0:
                # block (k, k-1) of L is U_{k-1}' L_{k-1}^{-T}
                s = sla.solve_triangular(lowers[-1], self.upper[k - 1], lower=True, check_finite=False).T
                subs.append(s)
                a = a - s @ s.T
            try:
                low = np.linalg.cholesky(a)
            except np.linalg.LinAlgError:
                return None
            if not np.all(np.isfinite(low)):
                return None
            lowers.append(low)
        return BlockCholesky(lowers, subs, self.offsets)


@dataclass
class BlockCholesky:
    """L with L L' = a block-tridiagonal matrix: lower-triangular diagonal blocks D_k and sub-diagonal
    blocks S_k = L[k+1, k]. Solves and the dense inverse cost O(n w) per column (w: the widest block)
    instead of O(n^2), which is what makes the interior-point method's slack side linear in depth."""

    lowers: list[np.ndarray]
    subs: list[np.ndarray]
    offs: np.ndarray

    @cached_property
    def inverse_lowers(self) -> list[np.ndarray]:
        """D_k^-1 (lower triangular): solves become products (the interior-point method's steps and
        step lengths need accuracy, not a proof; the certificate only asks whether the factorisation
        succeeds and never solves with it)."""
        return [sla.solve_triangular(d, np.eye(d.shape[0]), lower=True, check_finite=False) for d in self.lowers]

    def solve_lower(self, b: np.ndarray) -> np.ndarray:
        """L^-1 b (b: a vector or columns)."""
        o, y = self.offs, np.empty(b.shape)
        for k, d_inv in enumerate(self.inverse_lowers):
            rhs = b[o[k] : o[k + 1]]
            if k > 0:
                rhs = rhs - self.subs[k - 1] @ y[o[k - 1] : o[k]]
            y[o[k] : o[k + 1]] = d_inv @ rhs
        return y

    def solve_upper(self, y: np.ndarray) -> np.ndarray:
        """L^-T y."""
        o, x = self.offs, np.empty(y.shape)
        inv = self.inverse_lowers
        for k in range(len(self.lowers) - 1, -1, -1):
            rhs = y[o[k] : o[k + 1]]
            if k + 1 < len(self.lowers):
                rhs = rhs - self.subs[k].T @ x[o[k + 1] : o[k + 2]]
            x[o[k] : o[k + 1]] = inv[k].T @ rhs
        return x

    def solve(self, b: np.ndarray) -> np.ndarray:
        """(L L')^-1 b."""
        return self.solve_upper(self.solve_lower(b))

    def inverse(self) -> np.ndarray:
        """The dense inverse S = (L L')^-1, from L' S = L^-1 (block lower-triangular, diagonal blocks
        D_k^-1) solved upwards: S[k, j] = -D_k^-T S_k' S[k+1, j] for j > k, and
        S[k, k] = D_k^-T (D_k^-1 - S_k' S[k+1, k]). Cost O(n^2 w) instead of O(n^3)."""
        o, n = self.offs, int(self.offs[-1])
        inv = np.empty((n, n))
        last = len(self.lowers) - 1
        for k in range(last, -1, -1):
            d_inv = self.inverse_lowers[k]
            rows = slice(o[k], o[k + 1])
            if k == last:
                diag = d_inv.T @ d_inv
            else:
                st = self.subs[k].T  # S_k'
                right = -(d_inv.T @ (st @ inv[o[k + 1] : o[k + 2], o[k + 1] :]))
                inv[rows, o[k + 1] :] = right
                inv[o[k + 1] :, rows] = right.T
                diag = d_inv.T @ (d_inv - st @ right[:, : o[k + 2] - o[k + 1]].T)
            inv[rows, rows] = 0.5 * (diag + diag.T)
        return inv


def negated_lmi(net: Network, rho: float, t: np.ndarray, absolute: bool = False) -> BlockTridiagonal:
    """F = -M(rho, T) in block form. With `absolute`, the same formulas on |W|, |t|, |a|, |b| (used to
    bound the rounding error committed while forming F)."""
    ts = split_multipliers(net, t)
    ws = [dense(w) for w in net.weights]  # (the reduced LMI, `lipsdp.reduced`, is the one for CSR weights)
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
            # zero for ReLU-type slopes (a = 0): skip the n_k x n_(k-1) x n_(k-1) product of zeros
            block = w.T @ (s[:, None] * w) if np.any(s) else np.zeros((w.shape[1], w.shape[1]))
            c = mag((net.alphas[k] + net.betas[k]) * ts[k])
            upper.append(sign * (w.T * c[None, :]))
        else:
            block = sign * (w.T @ w)
        # block is this loop's own array: the same floats as adding rho I or diag(2 t)
        diag.append(add_to_diagonal(block, rho if k == 0 else 2.0 * mag(ts[k - 1])))
    return BlockTridiagonal(diag, upper)


def schur_rho(net: Network, t: np.ndarray) -> float | None:
    """rho*(T): the smallest rho with F(rho, T) PSD, assuming the hidden part R is positive definite.

    Returns None when R is not (numerically) positive definite, i.e. T certifies nothing. This is a
    floating-point estimate; `lipsdp.certificate` turns it into a proven bound.
    """
    return block_schur_rho(negated_lmi(net, 0.0, np.clip(t, 0.0, None)))


def _schur_backward(f: BlockTridiagonal, keep: bool = False,
                    consume: bool = False) -> tuple[np.ndarray, list[np.ndarray | None]] | None:
    """The backward block recursion D_m = F_mm, D_k = F_kk - U_k D_(k+1)^-1 U_k' down to the Schur complement
    S_0 = F_00 - U_0 D_1^-1 U_0' of F(0) on its blocks 1..; returns (S_0, [None, L_1, ..., L_m]) with the
    Cholesky factors D_k = L_k L_k' when `keep` (else Nones: one factor alive at a time), or None when some
    D_k is not (numerically) positive definite. With `consume`, f's diagonal blocks 1.. are factored in place
    and dropped (f is unusable after): on a CNN's 8192-wide blocks that saves a GB of copies."""
    m = len(f.diag) - 1
    lows: list[np.ndarray | None] = [None] * (m + 1)
    reduced = None
    for k in range(m, 0, -1):
        own = reduced is not None or consume  # d may be overwritten by its factor
        d = f.diag[k] if reduced is None else np.subtract(f.diag[k], reduced, out=reduced)
        if consume:
            f.diag[k] = None
        try:
            low = sla.cholesky(d, lower=True, overwrite_a=own, check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            return None
        del d, reduced
        reduced = gram_through(low, f.upper[k - 1].T)  # U_(k-1) D_k^-1 U_(k-1)'
        if keep:
            lows[k] = low
        del low
    return (f.diag[0] if reduced is None else f.diag[0] - reduced), lows


def block_schur_rho(f: BlockTridiagonal) -> float | None:
    """rho*: -lambda_min of the Schur complement of F(0) on its blocks 1.. (backward block recursion), or
    None when those blocks are not (numerically) positive definite. F(rho) is F(0) + rho on block 0."""
    backward = _schur_backward(f)
    if backward is None:
        return None
    s = backward[0]
    lam = sla.eigvalsh(0.5 * (s + s.T), subset_by_index=[0, 0], check_finite=False)[0]
    if not np.isfinite(lam):
        return None
    return max(0.0, -float(lam))


def schur_top_pair(f: BlockTridiagonal, start: np.ndarray | None = None,
                   consume: bool = False) -> tuple[float, list[np.ndarray]] | None:
    """rho* (as `block_schur_rho`) with the minimiser of z'F(0)z over unit z_0: [z_0, z_1, ..., z_m], z_0
    the eigenvector of the Schur complement S_0 for its smallest eigenvalue and z_k = -D_k^-1 U_(k-1)' z_(k-1)
    (D_k the backward recursion's complements), so z'F(0)z = -rho*. None when blocks 1.. are not
    (numerically) positive definite. `start`: a Lanczos start for z_0 (the last call's, when T moved little).
    For a simple top eigenvalue, d rho* / d theta = -z' (dF(0) / d theta) z (envelope theorem).
    `consume`: as for `_schur_backward`."""
    backward = _schur_backward(f, keep=True, consume=consume)
    if backward is None:
        return None
    s0, lows = backward
    lam, u = _lowest_eigenpair(0.5 * (s0 + s0.T), start, np.zeros((0, s0.shape[0])))
    if not np.isfinite(lam) or not np.all(np.isfinite(u)):
        return None
    zs = [u / np.linalg.norm(u)]
    for k in range(1, len(f.diag)):
        rhs = f.upper[k - 1].T @ zs[-1]
        zs.append(-sla.cho_solve((lows[k], True), rhs, check_finite=False))
    return max(0.0, -float(lam)), zs


def best_ray_scale(f: BlockTridiagonal, w_last) -> float:
    """The c >= 1 that minimises rho*(c T), from F = F(0, T) (blocks 0..l, l >= 1, hidden part definite) and
    the last weight W_l; 1.0 when no larger c does better.

    Every term of F(0, T) is linear in T except the last block's -W_l'W_l, so F(0, cT) / c = F(0, T) + beta
    W_l'W_l on block l (beta = 1 - 1/c) and rho*(cT) = c rho_beta. That change has rank at most n_out: with
    V V' = W_l'W_l on block l (V = W_l', or a square factor when the output is wider) and R the hidden part, Woodbury gives the Schur complement on block 0 as
    S(beta) = S_0 + beta Y (I + beta K)^-1 Y', where Y = F_01 R^-1 V and K = V' R^-1 V come out of one
    backward block recursion (R = U D U' with U unit block upper bidiagonal: K = sum_k y_k' D_k^-1 y_k for
    U y = V), so each c costs one eigenvalue of order n_0. rho*(cT) is convex in c (F(rho, cT) is affine in
    (rho, c), so its feasible set is convex): a bounded scalar search on log(c - 1) finds the minimum. An
    estimate for choosing T: the bound is proved afterwards by `lipsdp.certificate`.
    """
    from scipy.optimize import minimize_scalar

    if len(f.diag) < 2:
        return 1.0
    rows, cols = w_last.shape
    if rows <= cols:
        v = dense(w_last).T  # V V' = W_l'W_l, n_l x n_out
    else:  # a wide output (a part ending in a convolution): a square factor, rank n_l at most
        lam, q = np.linalg.eigh(gram(w_last, np.ones(rows)))
        v = q * np.sqrt(np.clip(lam, 0.0, None))[None, :]
    y, k_mat, reduced = v, np.zeros((v.shape[1], v.shape[1])), None
    for k in range(len(f.diag) - 1, 0, -1):
        d = f.diag[k] if reduced is None else f.diag[k] - reduced
        try:
            low = sla.cholesky(d, lower=True, check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            return 1.0
        del d
        h_y = sla.solve_triangular(low, y, lower=True, check_finite=False)  # L_k^-1 y_k
        k_mat += h_y.T @ h_y
        h_u = sla.solve_triangular(low, f.upper[k - 1].T, lower=True, check_finite=False)  # L_k^-1 U_(k-1)'
        del low
        reduced = h_u.T @ h_u  # U_(k-1) D_k^-1 U_(k-1)'
        y = -(h_u.T @ h_y)  # y_(k-1) = -U_(k-1) D_k^-1 y_k; after block 1, -Y
        del h_u, h_y
    s0 = f.diag[0] - reduced
    s0 = 0.5 * (s0 + s0.T)
    del reduced

    start = [None]  # the last eigenvector: neighbouring c have close ones, so Lanczos restarts from it

    def rho_at(c: float) -> float:
        beta = 1.0 - 1.0 / c
        core = sla.cholesky(add_to_diagonal(beta * k_mat, 1.0), lower=True, check_finite=False)
        z = sla.solve_triangular(core, y.T, lower=True, check_finite=False)
        lam, start[0] = _lowest_eigenpair(s0, start[0], z * math.sqrt(beta))
        return c * max(-lam, 0.0) if np.isfinite(lam) else math.inf

    at_one = rho_at(1.0)
    res = minimize_scalar(
        lambda u: min(rho_at(1.0 + math.exp(u)), 1e300), bounds=(-9.0, 3.0), method="bounded", options={"xatol": 0.05}
    )
    return 1.0 + math.exp(res.x) if np.isfinite(at_one) and res.fun < at_one else 1.0


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
        tau, x = sequential_step(x, dense(net.weights[k]), net.alphas[k], net.betas[k])
        taus.append(np.full(net.weights[k].shape[0], tau))
    rho = final_rho(x, dense(net.weights[-1]))
    return rho * np.concatenate(taus) if taus else np.zeros(0)


def sequential_step(x: np.ndarray, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """One layer of `sequential_multipliers`: from X_k and the layer (W, slopes a, b), its tau and X_(k+1)."""
    d = a + b
    ab = 2.0 * a * b
    chol = sla.cho_factor(x, lower=True, check_finite=False)
    k_mat = gram_through(chol[0], (w * d[:, None]).T)  # D W X^-1 W' D
    if not np.any(ab != 0):
        return relu_step(k_mat)
    lam = top_eigenvalue(k_mat)
    del k_mat
    tau = 1.0 / lam if lam > 1e-300 else 1.0
    cap = _tau_cap(chol, w, ab)
    tau = _best_tau(x, w, d, ab, min(tau, 0.5 * cap), cap)
    x_next = _next_quadratic_form(x, w, d, ab, tau)
    return tau, 0.5 * (x_next + x_next.T)


def relu_step(k_mat: np.ndarray) -> tuple[float, np.ndarray]:
    """`sequential_step` where a b = 0, from K = D W X^-1 W' D: tau = 1 / lambda_max(K) and
    X_(k+1) = 2 tau I - tau^2 K (from the K just formed: the same floats as forming it again)."""
    lam = top_eigenvalue(k_mat)
    tau = 1.0 / lam if lam > 1e-300 else 1.0
    x_next = add_to_diagonal(k_mat * -(tau * tau), 2.0 * tau)
    return tau, 0.5 * (x_next + x_next.T)


def final_rho(x: np.ndarray, w: np.ndarray) -> float:
    """The end of `sequential_multipliers`: rho = lambda_max(W_l X_l^-1 W_l'), raised by a relative 1e-6."""
    chol = sla.cho_factor(x, lower=True, check_finite=False)
    if w.shape[0] > w.shape[1]:  # a wide output (a part ending in a convolution): the same nonzero spectrum
        half = sla.solve_triangular(chol[0], w.T, lower=True, check_finite=False)  # L^-1 W' with X = L L'
        final = half @ half.T
    else:
        final = gram_through(chol[0], w.T)
    rho = top_eigenvalue(final)
    # A slightly larger rho keeps the hidden block strictly definite (it is singular at rho exactly when the
    # last layer is orthogonal to some direction, e.g. |x| = relu(x) + relu(-x)); certify recomputes rho.
    return max(rho, 1e-300) * (1.0 + 1e-6)


def gram_through(low: np.ndarray, b: np.ndarray) -> np.ndarray:
    """B' (L L')^-1 B as H'H with H = L^-1 B: one triangular solve, not the two of a Cholesky solve."""
    h = sla.solve_triangular(low, b, lower=True, check_finite=False)
    return h.T @ h


LANCZOS_MIN = 1500  # from this order on, extreme eigenvalues by Lanczos (O(n^2) per step, not O(n^3))


def top_eigenvalue(m: np.ndarray) -> float:
    """The largest eigenvalue of the symmetric part of m: LAPACK below LANCZOS_MIN, else Lanczos (ARPACK,
    a fixed start: deterministic) to a relative 1e-12, LAPACK if ARPACK fails. An estimate for
    choosing multipliers: every bound is proved afterwards by `lipsdp.certificate`."""
    n = m.shape[0]
    if n >= LANCZOS_MIN:
        from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh

        op = LinearOperator((n, n), matvec=lambda v: 0.5 * (m @ v.reshape(-1) + m.T @ v.reshape(-1)), dtype=m.dtype)
        try:
            v0 = np.ones(n) + 1e-3 * np.cos(np.arange(n))
            return float(eigsh(op, k=1, which="LA", v0=v0, tol=1e-12, return_eigenvectors=False)[0])
        except ArpackError:  # no convergence, or a start in an invariant subspace (m = 0): LAPACK
            pass
    return float(sla.eigvalsh(0.5 * (m + m.T), subset_by_index=[n - 1] * 2, check_finite=False)[0])


def _lowest_eigenpair(s: np.ndarray, start: np.ndarray | None, z: np.ndarray) -> tuple[float, np.ndarray]:
    """The smallest eigenvalue of the symmetric s + z'z and its eigenvector: LAPACK below order 256, else
    Lanczos on the operator (never forming s + z'z) from `start` (deterministic for a given start; a close
    start, the last trial's vector, converges in a few dozen products) to a relative 1e-10, LAPACK if ARPACK
    fails. An estimate, like `top_eigenvalue`."""
    n = s.shape[0]
    if n >= 256:
        from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh

        op = LinearOperator((n, n), matvec=lambda v: s @ v.reshape(-1) + z.T @ (z @ v.reshape(-1)), dtype=s.dtype)
        v0 = start if start is not None else np.ones(n) + 1e-3 * np.cos(np.arange(n))
        try:
            lam, vec = eigsh(op, k=1, which="SA", v0=v0, tol=1e-10)
            return float(lam[0]), vec[:, 0]
        except ArpackError:
            pass
    lam, vec = sla.eigh(s + z.T @ z, subset_by_index=[0, 0], check_finite=False)
    return float(lam[0]), vec[:, 0]


def _next_quadratic_form(x: np.ndarray, w: np.ndarray, d: np.ndarray, ab: np.ndarray, tau: float) -> np.ndarray:
    p = x + tau * (w.T @ (ab[:, None] * w)) if np.any(ab) else x
    dw = d[:, None] * w
    return add_to_diagonal(-(tau * tau) * (dw @ np.linalg.solve(p, dw.T)), 2.0 * tau)  # 2 tau I - ...


def add_to_diagonal(a: np.ndarray, values: float | np.ndarray) -> np.ndarray:
    """a + diag(values), in place on the square array a (returned): the same floats as adding a formed
    diagonal matrix (off the diagonal x + 0 = x), without an n x n temporary."""
    np.einsum("ii->i", a)[...] += values
    return a


def _tau_cap(chol, w: np.ndarray, ab: np.ndarray) -> float:
    """The largest tau keeping X + tau W' diag(ab) W positive definite (inf unless some a b < 0, e.g. the
    slopes [-1, 1] of |.|, where the layer's own block X - 2 tau W'W must stay definite)."""
    c = np.maximum(-ab, 0.0)
    if not np.any(c > 0):
        return np.inf
    cw = np.sqrt(c)[:, None] * w
    k_mat = cw @ sla.cho_solve(chol, cw.T, check_finite=False)
    lam = float(sla.eigvalsh(0.5 * (k_mat + k_mat.T), subset_by_index=[k_mat.shape[0] - 1] * 2)[0])
    return 1.0 / lam if lam > 1e-300 else np.inf


def _best_tau(x: np.ndarray, w: np.ndarray, d: np.ndarray, ab: np.ndarray, tau0: float, cap: float = np.inf) -> float:
    """Maximise lambda_min of the next quadratic form over tau < cap (1-D search on log tau).

    X_(k+1)(tau) = 2 tau I - tau^2 K(tau), K = D W P^-1 W' D with P = X + tau W' diag(ab) W, so its smallest
    eigenvalue is 2 tau - tau^2 lambda_max(K): each evaluation is one Cholesky factorisation P = L L' (order
    n_k), H = L^-1 W' D, and the top eigenvalue of H'H or HH', whichever is smaller (`top_eigenvalue`);
    never an LU solve, the next form itself or its whole spectrum (a residual net's 4096-wide layers: about
    3x faster). None is repeated."""
    from scipy.optimize import minimize_scalar

    live = ab != 0
    c_mat = w[live].T @ (ab[live, None] * w[live])  # W' diag(ab) W: fixed, P moves with tau only
    dw_t = (d[:, None] * w).T
    seen: dict[float, float] = {}

    def negative_min_eig(log_tau: float) -> float:
        if log_tau not in seen:
            tau = float(np.exp(log_tau))
            try:
                low = sla.cholesky(x + tau * c_mat, lower=True, check_finite=False)
            except (np.linalg.LinAlgError, ValueError):
                seen[log_tau] = np.inf
                return np.inf
            h = sla.solve_triangular(low, dw_t, lower=True, check_finite=False)  # L^-1 W' D
            del low
            top = top_eigenvalue(h.T @ h if h.shape[1] <= h.shape[0] else h @ h.T)
            seen[log_tau] = -(2.0 * tau - tau * tau * top) if np.isfinite(top) else np.inf
        return seen[log_tau]

    centre = float(np.log(tau0))
    top = min(centre + 6.0, np.log(cap) + np.log1p(-1e-7)) if np.isfinite(cap) else centre + 6.0
    res = minimize_scalar(negative_min_eig, bounds=(min(centre - 3.0, top - 1.0), top), method="bounded")
    best = float(np.exp(res.x))
    return best if negative_min_eig(float(res.x)) <= negative_min_eig(centre) else tau0


def _powers_of_four(exps, n: int) -> np.ndarray:
    """4^e for an exponent or one per entry, as n floats (inf or 0 outside the float64 range)."""
    return np.ldexp(np.ones(n), np.broadcast_to(2 * np.asarray(exps, dtype=np.int64), (n,)))


def weighted_squares(w, p: np.ndarray, rows: bool) -> np.ndarray:
    """sum_j w_ij^2 p_j per row (`rows`), else sum_i w_ij^2 p_i per column; dense (no w * w copy) or sparse."""
    if sp.issparse(w):
        sq = w.multiply(w)
        return np.asarray(sq @ p if rows else sq.T @ p).reshape(-1)
    return np.einsum("ij,ij,j->i", w, w, p) if rows else np.einsum("ij,ij,i->j", w, w, p)


def _scaling_is_safe(w, low: int, high: int) -> bool:
    """Scaling every entry of w by a power of two 2^s, low <= s <= high, is exact: no overflow, and for
    s < 0 the smallest nonzero magnitude stays normal. Read in row chunks (no copy of w)."""
    big, small = 0.0, np.inf
    if sp.issparse(w):
        w = w.data.reshape(1, -1)
    step = max(1, (1 << 22) // max(w.shape[1], 1))
    for i in range(0, w.shape[0], step):
        a = np.abs(w[i : i + step])
        big = max(big, float(a.max(initial=0.0)))
        nonzero = a[a > 0]
        if nonzero.size:
            small = min(small, float(nonzero.min()))
    if not np.isfinite(big) or (big > 0 and math.log2(big) + high >= 1023):
        return False
    return low >= 0 or small == np.inf or math.log2(small) + low >= -1021


def norm_estimate(w: np.ndarray, steps: int = 30, scaling: tuple | None = None) -> float:
    """||w||_2 to a few per cent (power iteration from a fixed start): enough to choose a power of two,
    and O(steps * size) instead of an SVD. `scaling` (column, row exponents): of diag(2^-row) w diag(2^col),
    without forming it."""
    if scaling is not None and min(w.shape) <= 64:
        w = Balancing._scaled(w, *scaling)
        scaling = None
    if min(w.shape) <= 64:
        return float(np.linalg.norm(w.toarray() if sp.issparse(w) else w, 2))
    cols, rows = scaling if scaling is not None else (0, 0)
    v = np.ones(w.shape[1]) / np.sqrt(w.shape[1]) + 1e-3 * np.cos(np.arange(w.shape[1]))
    norm = 0.0
    for _ in range(steps):
        u = np.ldexp(w @ np.ldexp(v, cols), np.negative(rows))
        v = np.ldexp(w.T @ np.ldexp(u, np.negative(rows)), cols)
        norm_v = float(np.linalg.norm(v))
        if not (norm_v > 0 and np.isfinite(norm_v)):
            return float(np.linalg.norm(w))
        norm = float(np.sqrt(norm_v))
        v /= norm_v
    return norm


@dataclass(frozen=True)
class Balancing:
    """Exact power-of-two diagonal congruence of the LMI, one factor per coordinate.

    With D = diag(2^e_0 I, 2^e_1, ..., 2^e_l) over the stacked state (the input block scalar, every hidden
    neuron its own exponent) and an output exponent o, the network with weights
    W^_k = diag(2^-e_{k+1}) W_k diag(2^e_k) (e_{l+1} = o), multipliers t^_k = t_k 2^(2 e_k - 2 o) and
    rho^ = rho 2^(2 e_0 - 2 o) has the LMI F^ = D F D 2^-2o (check block by block with the formulas above:
    every term picks up exactly the factors of its row and column). The slope bounds are unchanged. So
    F^ >= 0 iff F >= 0, and since every factor is a power of two the scaled numbers are exact in floating
    point (checked when built; a scaling that would not be exact is dropped), so a proof for the balanced
    LMI is a proof for the original one. Per-layer scalars are the special case of constant e_k.

    Why per neuron: trained and ill-conditioned nets have neurons whose weights differ by many orders of
    magnitude; the interior-point method's tolerances and the certificate's norm-wise rounding margin are
    only meaningful when the LMI's diagonal is of one scale.
    """

    input_exp: int
    hidden_exps: tuple[np.ndarray, ...]
    output_exp: int = 0

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def identity(cls, net: Network) -> Balancing:
        return cls(0, tuple(np.zeros(n, dtype=np.int64) for n in net.hidden_sizes), 0)

    @classmethod
    def of(cls, net: Network, per_neuron: bool = True, sweeps: int = 6) -> Balancing:
        """A scaling from the weights alone: each hidden neuron's incoming row and outgoing column are
        given equal norms (a few forward/backward sweeps; skipped unless `per_neuron`), then every layer a
        spectral norm of about 1."""
        bal = cls.identity(net)
        if net.depth and per_neuron:
            exps = [np.zeros(n, dtype=np.int64) for n in net.hidden_sizes]
            for sweep in range(sweeps):
                order = range(net.depth) if sweep % 2 == 0 else range(net.depth - 1, -1, -1)
                for k in order:
                    # row norms of W_k and column norms of W_(k+1) as scaled, without a scaled copy
                    col_in, row_out = exps[k - 1] if k else 0, exps[k + 1] if k + 1 < net.depth else 0
                    w_in, w_out = net.weights[k], net.weights[k + 1]
                    rows = np.sqrt(weighted_squares(w_in, _powers_of_four(col_in, w_in.shape[1]), rows=True))
                    rows = np.ldexp(rows, -exps[k])
                    cols = np.sqrt(weighted_squares(w_out, _powers_of_four(-np.asarray(row_out), w_out.shape[0]), rows=False))
                    cols = np.ldexp(cols, exps[k])
                    ok = (rows > 0) & (cols > 0) & np.isfinite(rows) & np.isfinite(cols)
                    step = np.zeros(len(rows), dtype=np.int64)
                    step[ok] = np.round(0.5 * np.log2(rows[ok] / cols[ok])).astype(np.int64)
                    exps[k] = exps[k] + step
            bal = cls(0, tuple(exps), 0).exact_or_coarser(net)
        # per-layer scalars: spectral norm about 1 for every layer of the neuron-balanced net
        wanted = []
        for k, w in enumerate(net.weights):
            norm = norm_estimate(w, scaling=(bal._exps(k, net), bal._exps(k + 1, net)))
            wanted.append(-int(np.round(np.log2(norm))) if norm > 0 and np.isfinite(norm) else 0)
        # W^_k = W_k 2^(c_k - c_{k+1}) with block exponents c; c_{l+1} = 0 and c_k - c_{k+1} = wanted[k]
        block = [0] * (len(net.weights) + 1)
        for k in range(len(net.weights) - 1, -1, -1):
            block[k] = block[k + 1] + wanted[k]
        layered = Balancing(
            block[0], tuple(np.full(n, block[k + 1], dtype=np.int64) for k, n in enumerate(net.hidden_sizes)), 0
        )
        return bal.then(layered).exact_or_coarser(net)

    @classmethod
    def equilibrating(cls, net: Network, rho: float, t: np.ndarray, per_neuron: bool = True) -> Balancing:
        """A scaling that gives F(rho, T) a diagonal of about 1 (input block: its largest entry), which is
        what makes a norm-wise rounding margin small relative to F's smallest eigenvalue. Without
        `per_neuron`, one factor per layer (its largest diagonal entry): layer-tied multipliers stay tied."""
        ts = split_multipliers(net, np.clip(t, 0.0, None))
        if net.depth == 0:
            return cls.identity(net)
        diag = []
        for k in range(net.depth + 1):
            w = net.weights[k]
            if k < net.depth:
                sq = weighted_squares(w, 2.0 * net.alphas[k] * net.betas[k] * ts[k], rows=False)
            else:
                sq = -weighted_squares(w, np.ones(w.shape[0]), rows=False)
            diag.append(sq + (rho if k == 0 else 2.0 * ts[k - 1]))

        def exponent(x: np.ndarray) -> np.ndarray:
            out = np.zeros(x.shape, dtype=np.int64)
            ok = np.isfinite(x) & (x > 0)
            out[ok] = -np.round(0.5 * np.log2(x[ok])).astype(np.int64)
            return out

        if not per_neuron:
            diag = [np.full(d.shape, np.max(d)) for d in diag]
        input_exp = int(exponent(np.array([np.max(diag[0])]))[0])
        return cls(input_exp, tuple(exponent(d) for d in diag[1:]), 0).exact_or_coarser(net)

    def is_identity(self) -> bool:
        return self.input_exp == 0 and self.output_exp == 0 and not any(np.any(e) for e in self.hidden_exps)

    def then(self, other: Balancing) -> Balancing:
        """The composition: first self, then other (exponents add)."""
        return Balancing(
            self.input_exp + other.input_exp,
            tuple(a + b for a, b in zip(self.hidden_exps, other.hidden_exps)),
            self.output_exp + other.output_exp,
        )

    def with_output_exp(self, output_exp: int) -> Balancing:
        return replace(self, output_exp=int(output_exp))

    def normalising_rho(self, rho_balanced: float) -> Balancing:
        """The same scaling with the output exponent moved so that the balanced rho is about 1."""
        if not (np.isfinite(rho_balanced) and rho_balanced > 0):
            return self
        return self.with_output_exp(self.output_exp + int(np.round(0.5 * np.log2(rho_balanced))))

    # -- application ----------------------------------------------------------------------------
    @staticmethod
    def _scaled(w: np.ndarray, col_exp, row_exp) -> np.ndarray:
        """diag(2^-row_exp) w diag(2^col_exp); each exponent is a scalar or one per column / row. A sparse
        (CSR) w stays sparse: each stored entry is scaled the same way."""
        if sp.issparse(w):
            w = sp.csr_array(w, copy=True)
            row_of = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
            cols = np.broadcast_to(np.asarray(col_exp, dtype=np.int64), (w.shape[1],))
            rows = np.broadcast_to(np.asarray(row_exp, dtype=np.int64), (w.shape[0],))
            w.data = np.ldexp(w.data, cols[w.indices] - rows[row_of])
            return w
        cols = np.asarray(col_exp).reshape(1, -1) if np.ndim(col_exp) else np.asarray(col_exp)
        rows = np.asarray(row_exp).reshape(-1, 1) if np.ndim(row_exp) else np.asarray(row_exp)
        return np.ldexp(w, np.broadcast_to(cols - rows, w.shape))

    def _exps(self, k: int, net: Network):
        """Exponent(s) of state block k (0: input, 1..l: hidden, l + 1: output)."""
        if k == 0:
            return self.input_exp
        if k <= net.depth:
            return self.hidden_exps[k - 1]
        return self.output_exp

    def _weights(self, net: Network) -> list[np.ndarray]:
        return [self._scaled(w, self._exps(k, net), self._exps(k + 1, net)) for k, w in enumerate(net.weights)]

    def is_exact(self, net: Network) -> bool:
        """True when every scaled weight is exactly 2^(...) times the original (no overflow, no rounding).

        First a sufficient test on each weight's magnitude range (scaling by 2^s is exact unless it
        overflows or, for s < 0, leaves the normal range); only where it fails, every entry scaled and back."""
        for k, w in enumerate(net.weights):
            cols, rows = np.asarray(self._exps(k, net)), np.asarray(self._exps(k + 1, net))
            if w.size == 0 or _scaling_is_safe(w, int(cols.min() - rows.max()), int(cols.max() - rows.min())):
                continue
            s = self._scaled(w, cols, rows)
            back = self._scaled(s, -cols, -rows)
            if sp.issparse(w):
                if not (all_finite(s) and np.array_equal(back.data, sp.csr_array(w).data)):
                    return False
            elif not (np.all(np.isfinite(s)) and np.array_equal(back, w)):
                return False
        return True

    def exact_or_coarser(self, net: Network) -> Balancing:
        """This scaling if it is exact, else no scaling at all (always exact)."""
        return self if self.is_exact(net) else Balancing.identity(net)

    def network(self, net: Network) -> Network:
        return replace(net, weights=tuple(self._weights(net)))

    def _multiplier_shifts(self, net: Network) -> np.ndarray:
        if not net.depth:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([2 * e - 2 * self.output_exp for e in self.hidden_exps]).astype(np.int64)

    def multipliers(self, net: Network, t: np.ndarray) -> np.ndarray:
        """Original multipliers -> balanced ones (exact unless they leave the float64 range)."""
        return np.ldexp(np.asarray(t, dtype=np.float64), self._multiplier_shifts(net)) if net.depth else np.asarray(t)

    def original_multipliers(self, net: Network, t_balanced: np.ndarray) -> np.ndarray:
        t_balanced = np.asarray(t_balanced, dtype=np.float64)
        return np.ldexp(t_balanced, -self._multiplier_shifts(net)) if net.depth else t_balanced

    def balanced_rho(self, rho: float) -> float:
        return float(np.ldexp(rho, 2 * self.input_exp - 2 * self.output_exp))

    def original_rho(self, rho_balanced: float) -> float:
        return float(np.ldexp(rho_balanced, 2 * self.output_exp - 2 * self.input_exp))
