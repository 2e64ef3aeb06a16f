"""The LipSDP LMI with wide hidden layers eliminated: the same inequality on a smaller block-tridiagonal matrix.

A CIFAR-10 CNN's first convolutions are its widest layers (ConvBig: 3072 -> 32768 -> 8192 -> 16384 ->
4096 -> ...). The dense LMI holds an n_j x n_j block per layer, 8.6 GB for 32768 neurons; here such a
layer never gets one.

Proof obligation. In F = -M(rho, T) (`lipsdp.lmi`, blocks x_0 .. x_l), the diagonal block of hidden layer
j (1 <= j < l) is F_jj = 2 diag(t_j) + W_j' diag(2 a b t)_(j+1) W_j: diagonal when the next layer's slopes
have a b = 0, and positive definite when moreover every t_j > 0. Then F > 0 iff its Schur complement on
block j is (Haynsworth), and that complement changes only the neighbours p = j - 1 and q = j + 1
(c = a + b, per neuron):

    F'_pp = F_pp - 1/2 W_p' diag(c_j^2 t_j) W_p
    F'_qq = F_qq - 1/2 diag(c_q t_q) W_j diag(1 / t_j) W_j' diag(c_q t_q)
    F'_pq = -1/2 W_p' diag(c_j) W_j' diag(c_q t_q)         (t_j cancels)

so block p stays diagonal-or-not as it was elsewhere and the result is block tridiagonal again over the
kept layers. Eliminating non-adjacent layers one after the other (each complement leaves the other
eliminated blocks untouched) gives F' over the kept layers, the input block (where rho is) always among
them: F(rho, T) > 0 iff F'(rho, T) > 0 for every rho, so rho*(T) and every proof carry over unchanged.
Here both layer j's and layer q's slopes must have a b = 0 (ReLU: a = 0): then F_pp's own term
W_p' diag(2 a b t)_j W_p is zero, and `sequential_multipliers` can keep X_j implicit (below).

Rounding (for `certificate.prove_forms_positive_definite`): each entry of F' is a sum of at most
`Reduction.inner` nonzero products of at most six stored or once-rounded floats (w, 1/t, c t, ...), in
any order, so |fl(F') - F'| <= g_inner |F'|_abs entrywise (Higham (3.13)), |F'|_abs being the same
formulas on absolute values. Only nonzero terms count: 0 y = 0 and s + 0 = s are exact, so in any
summation tree a nonzero term meets at most k - 1 rounded additions for k nonzero terms; an unrolled
convolution's products have a few hundred per entry where the layers have tens of thousands of neurons. Its row sums are computed as products of |W| with non-negative vectors (never forming
|F'|_abs); each computed sum of non-negative terms is within a factor (1 - g_m) of its exact value, m <=
the sum of all widths, which the factor (1 + 2 g_m) applied here covers.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import scipy.linalg as sla

from lipsdp.lmi import (
    BlockTridiagonal,
    add_to_diagonal,
    best_ray_scale,
    block_schur_rho,
    final_rho,
    gram_through,
    negated_lmi,
    relu_step,
    schur_top_pair,
    sequential_step,
    split_multipliers,
    top_eigenvalue,
)
from lipsdp.lmi import schur_rho as full_schur_rho
from lipsdp.network import Network, dense_weights
from lipsdp.weights import chain, cogram, dense, gram, most_per_column, most_per_row, stored

# A hidden layer at least this wide, and at least as wide as both neighbours, is eliminated when it can be.
MIN_WIDTH = 4096
UNIT_ROUNDOFF = 2.0**-53


def plan(net: Network, min_width: int | None = None) -> tuple[int, ...]:
    """The hidden layers j (1 <= j < l, state-block numbering) to eliminate: non-adjacent, at least
    `min_width` wide and as wide as both neighbours, with a b = 0 for the slopes of layers j and j + 1.
    Widest first; () when none qualifies (the dense LMI is then used unchanged)."""
    sizes, chosen = net.sizes, set()
    min_width = MIN_WIDTH if min_width is None else min_width

    def relu_like(j: int) -> bool:  # slopes of hidden layer j (1-based)
        return not np.any(net.alphas[j - 1] * net.betas[j - 1])

    for j in sorted(range(1, net.depth), key=lambda j: -sizes[j]):
        if sizes[j] < min_width or sizes[j] < max(sizes[j - 1], sizes[j + 1]):
            continue
        if j - 1 in chosen or j + 1 in chosen or not (relu_like(j) and relu_like(j + 1)):
            continue
        chosen.add(j)
    return tuple(sorted(chosen))


class Reduction:
    """The kept blocks of F' for one network and elimination plan (the weights prepared once)."""

    def __init__(self, net: Network, eliminated: tuple[int, ...]):
        self.net, self.eliminated = net, tuple(eliminated)
        self.kept = [k for k in range(net.depth + 1) if k not in self.eliminated]
        self.ws = [stored(w) for w in net.weights]
        self.abs_ws = [abs(w) for w in self.ws]
        sizes, gone = net.sizes, set(self.eliminated)
        # nonzero terms of one entry of F'_pp: its own product W_p'(.)W_p (W_l'W_l for p = l), the
        # eliminated neighbours' products and the diagonal; of F'_pq: one product. Six roundings per term
        # at most; a zero term adds no rounding (0 y and s + 0 are exact), so only nonzero ones count.
        col = [most_per_column(w) for w in self.ws]
        row = [most_per_row(w) for w in self.ws]
        counts = [
            col[p] * (2 if p + 1 in gone else 1) + (row[p - 1] if p - 1 in gone else 0) + 1 for p in self.kept
        ]
        counts += [min(col[j - 1], row[j]) for j in self.eliminated]
        self.inner = max(counts) + 8
        self.total_width = int(sum(sizes)) + 8

    def forms(self, t: np.ndarray) -> tuple[BlockTridiagonal, np.ndarray]:
        """F'(0, T) over the kept blocks and the row sums of |F'|_abs (module docstring)."""
        net, ws, aws, gone = self.net, self.ws, self.abs_ws, set(self.eliminated)
        ts = [np.zeros(0)] + split_multipliers(net, t)  # ts[k]: multipliers of state block k
        cs = [np.zeros(0)] + [np.asarray(a + b, np.float64) for a, b in zip(net.alphas, net.betas)]
        l, sizes = net.depth, net.sizes
        diag, upper, sums = [], [], []
        for i, p in enumerate(self.kept):
            ones = np.ones(sizes[p])
            if p < l:
                s = 2.0 * net.alphas[p] * net.betas[p] * ts[p + 1]
                block = gram(ws[p], s) if np.any(s) else np.zeros((sizes[p], sizes[p]))
                row = aws[p].T @ (np.abs(s) * (aws[p] @ ones))
            else:
                block = -gram(ws[l], np.ones(sizes[l + 1]))
                row = aws[l].T @ (aws[l] @ ones)
            if p + 1 in gone:  # - 1/2 W_p' diag(c_j^2 t_j) W_p
                s = 0.5 * cs[p + 1] ** 2 * ts[p + 1]
                block -= gram(ws[p], s)
                row = row + aws[p].T @ (np.abs(s) * (aws[p] @ ones))
            if p - 1 in gone:  # - 1/2 diag(c_p t_p) W_j diag(1/t_j) W_j' diag(c_p t_p)
                j, ct = p - 1, cs[p] * ts[p]
                inv = 1.0 / ts[j]
                term = cogram(ws[j], inv)  # scaled in place: the same floats, no n_p x n_p temporaries
                term *= (0.5 * ct)[:, None]
                term *= ct[None, :]
                block -= term
                del term
                act = np.abs(ct)
                row = row + 0.5 * act * (aws[j] @ (inv * (aws[j].T @ act)))
            if p > 0:
                add_to_diagonal(block, 2.0 * ts[p])
                row = row + 2.0 * np.abs(ts[p])
            diag.append(block)
            sums.append(row)
            del block
        for i, (p, q) in enumerate(pairwise(self.kept)):
            ct = cs[q] * ts[q]
            act = np.abs(ct)
            if q == p + 1:  # -W_p' diag(c_q t_q)
                u = dense(ws[p].T) * -ct[None, :]
                sums[i] = sums[i] + aws[p].T @ act
                sums[i + 1] = sums[i + 1] + act * (aws[p] @ np.ones(sizes[p]))
            else:  # -1/2 W_p' diag(c_j) W_j' diag(c_q t_q)
                j = p + 1
                u = chain(ws[p].T, -0.5 * cs[j], ws[j].T) * ct[None, :]
                acj = np.abs(cs[j])
                sums[i] = sums[i] + 0.5 * (aws[p].T @ (acj * (aws[j].T @ act)))
                sums[i + 1] = sums[i + 1] + 0.5 * act * (aws[j] @ (acj * (aws[p] @ np.ones(sizes[p]))))
            upper.append(u)
        g = self.total_width * UNIT_ROUNDOFF / (1.0 - self.total_width * UNIT_ROUNDOFF)
        return BlockTridiagonal(diag, upper), np.concatenate(sums) * (1.0 + 2.0 * g)

    def rho(self, t: np.ndarray) -> float | None:
        """rho*(T) from F' (the same value as `lmi.schur_rho` on the full LMI), or None."""
        return block_schur_rho(self.forms(np.clip(t, 0.0, None))[0])

    def rho_gradient(self, t: np.ndarray,
                     start: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray] | None:
        """rho*(T), its gradient in t and the top eigenvector of the input block's Schur complement (a
        Lanczos start for the next call), or None where the hidden blocks of F' are not positive definite.

        Envelope theorem on the full LMI:
            z'F(0, T)z = sum_i 2 t_i (x_i - a_i y_i)(x_i - b_i y_i) - |W_l x_l|^2   (y_k = W_(k-1) x_(k-1)),
        and -rho* is its minimum over z with unit x_0; so for a simple top eigenvalue
        d rho* / d t_i = -2 (x_i - a_i y_i)(x_i - b_i y_i) at the minimiser. `lmi.schur_top_pair` gives the
        minimiser on the kept blocks; an eliminated layer's part solves its diagonal block,
        x_j = c_j (W_(j-1) x_(j-1)) / 2 + W_j'(c_(j+1) t_(j+1) x_(j+1)) / (2 t_j). Only products with the
        (sparse) weights: no eliminated block is formed. An estimate that steers the descent, not a proof."""
        net = self.net
        pair = schur_top_pair(self.forms(t)[0], start, consume=True)
        if pair is None:
            return None
        rho, zs = pair
        ts = [np.zeros(0)] + split_multipliers(net, t)
        xs: list[np.ndarray | None] = [None] * (net.depth + 1)
        for p, z in zip(self.kept, zs):
            xs[p] = z
        for j in self.eliminated:
            c_j = net.alphas[j - 1] + net.betas[j - 1]
            c_q = net.alphas[j] + net.betas[j]
            back = self.ws[j].T @ (c_q * ts[j + 1] * xs[j + 1])
            xs[j] = 0.5 * c_j * (self.ws[j - 1] @ xs[j - 1]) + back / (2.0 * ts[j])
        grads = []
        for k in range(1, net.depth + 1):
            y = self.ws[k - 1] @ xs[k - 1]
            grads.append(-2.0 * (xs[k] - net.alphas[k - 1] * y) * (xs[k] - net.betas[k - 1] * y))
        return rho, np.concatenate(grads), zs[0]


def usable(net: Network, eliminated: tuple[int, ...], t: np.ndarray) -> tuple[int, ...]:
    """`eliminated` when every multiplier of those layers is finite and > 0 (the Schur complement needs
    diag(t_j) > 0), else () (the full LMI)."""
    if not eliminated:
        return ()
    ts = split_multipliers(net, t)
    ok = all(np.all(np.isfinite(ts[j - 1]) & (ts[j - 1] > 0)) for j in eliminated)
    return tuple(eliminated) if ok else ()


def schur_rho(net: Network, t: np.ndarray, eliminated: tuple[int, ...]) -> float | None:
    """`lmi.schur_rho`, on F' when `eliminated` is usable for t."""
    eliminated = usable(net, eliminated, t)
    return Reduction(net, eliminated).rho(t) if eliminated else full_schur_rho(dense_weights(net), t)


def along_ray(net: Network, t: np.ndarray, eliminated: tuple[int, ...] = ()) -> np.ndarray:
    """c T for the c >= 1 that minimises rho*(c T) (`lmi.best_ray_scale`). The greedy multipliers stop at
    c = 1, where the last layer's -W_l'W_l only just leaves the hidden blocks definite; rho*(c T) is steep
    there, and a larger scale is often much tighter (cifar10_small of VNN-COMP: 1069 -> 801, LipSDP-Layer's
    optimum being 795). Costs one more Schur recursion and a few eigenvalues of order n_0. Soundness does not
    depend on c: the certificate proves the scaled T like any other."""
    if net.depth == 0 or t.size == 0:
        return t
    kept = usable(net, eliminated, t)
    forms = Reduction(net, kept).forms(t)[0] if kept else negated_lmi(net, 0.0, np.clip(t, 0.0, None))
    return best_ray_scale(forms, net.weights[-1]) * t


def sequential_multipliers(net: Network, eliminated: tuple[int, ...]) -> np.ndarray:
    """`lmi.sequential_multipliers` (the same tau per layer in exact arithmetic) with the quadratic form
    X_j of every eliminated layer j kept implicit: X_j = 2 tau I - tau^2 H'H, H = L^-1 W' D (X_(j-1) = L L',
    D = diag(a + b) of layer j), whose largest eigenvalue is that of the n_(j-1)-square H H', and by
    Woodbury X_j^-1 = I / (2 tau) + 1/4 H' Z^-1 H with Z = I - tau/2 H H' (eigenvalues in [1/2, 1] at
    tau = 1 / lambda_max). So the next layer's D' W_j X_j^-1 W_j' D' needs only W_j W_j' and
    G' = L^-1 (W_j D W_(j-1))': no n_j x n_j matrix is ever formed."""
    ws = [stored(w) for w in net.weights]
    x = np.eye(net.sizes[0])
    taus: list[np.ndarray] = []
    k = 0
    while k < net.depth:
        j = k + 1  # the layer this step makes
        if j not in eliminated:
            tau, x = sequential_step(x, dense(net.weights[k]), net.alphas[k], net.betas[k])
            taus.append(np.full(net.sizes[j], tau))
            k += 1
            continue
        d = np.asarray(net.alphas[k] + net.betas[k], np.float64)
        low = sla.cholesky(x, lower=True, check_finite=False)
        del x
        half = sla.solve_triangular(low, gram(ws[k], d * d), lower=True, check_finite=False)
        hh = sla.solve_triangular(low, half.T, lower=True, check_finite=False)  # L^-1 W' D^2 W L^-T
        hh = 0.5 * (hh + hh.T)
        del half
        lam = top_eigenvalue(hh)
        tau = 1.0 / lam if lam > 1e-300 else 1.0
        z = add_to_diagonal(hh * (-0.5 * tau), 1.0)
        del hh
        z_low = sla.cholesky(z, lower=True, check_finite=False)
        del z
        gt = sla.solve_triangular(low, chain(ws[j], d, ws[k]).T, lower=True, check_finite=False)
        d_next = np.asarray(net.alphas[j] + net.betas[j], np.float64)
        k_next = cogram(ws[j], np.full(net.sizes[j], 0.5 / tau))
        k_next += 0.25 * gram_through(z_low, gt)
        del gt, z_low, low
        k_next = d_next[:, None] * k_next * d_next[None, :]
        tau_next, x = relu_step(k_next)
        del k_next
        taus += [np.full(net.sizes[j], tau), np.full(net.sizes[j + 1], tau_next)]
        k += 2
    rho = final_rho(x, dense(net.weights[-1]))
    return rho * np.concatenate(taus) if taus else np.zeros(0)
