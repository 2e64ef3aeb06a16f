"""Turn multipliers T into a *proven* upper bound on the Lipschitz constant.

A solver's (rho, T) is only approximately feasible. We recompute the best rho for the given T (Schur
complement, `lmi.schur_rho`), raise it slightly to rho', and prove F(rho', T) = -M(rho', T) positive
definite in floating point, so that L <= sqrt(rho') holds for the network's stored float64 weights.

The proof (`prove_positive_definite`) combines two published error bounds, u = 2^-53, g_k = k u / (1 - k u):

1. Forming F: every entry is an inner product of m terms (plus a few scalar products), so
   |fl(F) - F| <= g_{m+6} |F|_abs entrywise, |F|_abs being the same formulas on absolute values
   (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, eq. (3.13), valid for any
   summation order), m counting nonzero terms only: 0 y = 0 and s + 0 = s are exact, so in any summation
   tree a nonzero term meets at most m - 1 rounded additions (an unrolled convolution's columns have a
   few hundred nonzeros where its layers have thousands of neurons). Its 2-norm is at most its largest
   row sum: e = g/(1-g) * max_i sum_j |F|_abs,ij.
2. Cholesky: if floating-point Cholesky of a symmetric A completes, the computed factor satisfies
   L L' = A + dA with |dA| <= g_{k+1} |L||L|' entrywise, k the number of nonzero terms of the entry's inner
   product (Higham, Thm 10.3; Rump, *Verification of positive definiteness*, BIT 46, 2006, Thm 2.3/Cor
   2.4, who notes that it holds for any evaluation order, blocked algorithms included, and zero terms
   that are never formed add no rounding). A is block tridiagonal and its factor block lower bidiagonal,
   so k <= w = max_k (n_{k-1} + n_k), two neighbouring blocks, not the whole order n. Then
   lambda_min(A) >= -||dA||_2 >= -g ||(|L|)||_2^2, bounded from the factor itself by Collatz-Wielandt
   (max_i (|L||L|'x)_i / x_i for a positive x near the Perron vector) or Hoelder (||L||_1 ||L||_inf, the
   largest column and row sums of |L|), whichever is smaller (`factor_norm_bound`); we use g_{2w+2} for
   extra room.
With wide hidden layers eliminated (`lipsdp.reduced`: their diagonal blocks are diagonal), the same proof
runs on the Schur complement F' over the other layers, which is positive definite iff F is; its forming
error is stated there.
So we factor A = fl(F - cI); success proves lambda_min(F_exact) >= c - u*max|F_ii - c| - g ||L||_1
||L||_inf - e, and we accept only when that number is positive. Assumes no underflow (entries far above
1e-290).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from lipsdp.lmi import (
    Balancing,
    BlockCholesky,
    BlockTridiagonal,
    add_to_diagonal,
    negated_lmi,
    sequential_multipliers,
)
from lipsdp.network import Network, dense_weights, sparse_weights
from lipsdp.reduced import Reduction, along_ray, plan, usable
from lipsdp.reduced import schur_rho as reduced_schur_rho
from lipsdp.reduced import sequential_multipliers as reduced_multipliers
from lipsdp.weights import all_finite, most_per_column

log = logging.getLogger(__name__)

UNIT_ROUNDOFF = 2.0**-53
# Relative increases of rho tried, in order, until the proof succeeds.
RHO_INFLATIONS = (1e-12, 1e-10, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 5e-2)
# From this LMI order on the smallest two are skipped: a factorisation costs seconds to minutes there, and
# at 1e-12 and 1e-10 the rounding margin of a CNN's LMI outgrows lambda_min(F) (cifar_base_kw sequential:
# 13 factorisations of order 6244 before, 2 after; the bound moves by at most 5e-9 relative)
LARGE_LMI_ORDER = 5000
LARGE_FIRST_INFLATION = 1e-4  # there, the given T is tried up to this inflation before the other recipes


def gamma(k: int) -> float:
    """Higham's g_k = k u / (1 - k u): the relative error of a k-term sum or inner product."""
    return k * UNIT_ROUNDOFF / (1.0 - k * UNIT_ROUNDOFF)


def _row_sums(f: BlockTridiagonal) -> np.ndarray:
    sums = [np.abs(d).sum(axis=1) for d in f.diag]
    for k, u in enumerate(f.upper):
        sums[k] = sums[k] + np.abs(u).sum(axis=1)
        sums[k + 1] = sums[k + 1] + np.abs(u).sum(axis=0)
    return np.concatenate(sums)


def factor_norm_bound(chol: BlockCholesky, steps: int = 4) -> float:
    """An upper bound on || |L| |L|' ||_2 = || |L| ||_2^2 for the computed factor L.

    Two bounds, the smaller returned: Hoelder's ||L||_1 ||L||_inf (the largest column and row sums of |L|),
    and Collatz-Wielandt's max_i (M x)_i / x_i for the nonnegative M = |L||L|' and any x > 0, which is at
    least M's largest eigenvalue (its 2-norm); x from `steps` power steps on M from the ones vector, so it
    is close to || |L| ||_2^2 where Hoelder can be off by the order of the matrix. Each computed sum has at
    most 2w non-negative terms (w: two neighbouring blocks), so it is within a factor (1 - g_2w) of the
    exact one; 4 g_2w covers both, the division and the products."""
    rows, cols = [], [np.abs(d).sum(axis=0) for d in chol.lowers]
    for k, d in enumerate(chol.lowers):
        r = np.abs(d).sum(axis=1)
        if k:
            sub = np.abs(chol.subs[k - 1])  # block (k, k-1)
            r = r + sub.sum(axis=1)
            cols[k - 1] = cols[k - 1] + sub.sum(axis=0)
        rows.append(r)
    width = max(_neighbour_width([d.shape[0] for d in chol.lowers]), 1)
    margin = 1.0 + 4.0 * gamma(2 * width + 2)
    hoelder = float(max(r.max() for r in rows)) * float(max(c.max() for c in cols)) * margin
    x = np.ones(int(chol.offs[-1]))
    ratio = np.inf
    for _ in range(steps + 1):
        y = _abs_factor_product(chol, x)
        if not np.all(np.isfinite(y)):
            return hoelder
        ratio = float(np.max(y / x))
        top = float(y.max())
        if not top > 0:
            return hoelder if not ratio >= 0 else min(hoelder, ratio * margin)
        x = np.maximum(y / top, 1e-8)  # stays > 0: the bound holds for any positive x
    return min(hoelder, ratio * margin)


def _abs_factor_product(chol: BlockCholesky, x: np.ndarray) -> np.ndarray:
    """|L| (|L|' x) for the block lower-bidiagonal factor, one block's |.| at a time."""
    o, n_blocks = chol.offs, len(chol.lowers)
    z = np.empty_like(x)
    for k, d in enumerate(chol.lowers):  # z = |L|' x: block k gets |D_k|' x_k + |S_k|' x_(k+1)
        zk = np.abs(d).T @ x[o[k] : o[k + 1]]
        if k + 1 < n_blocks:
            zk = zk + np.abs(chol.subs[k]).T @ x[o[k + 1] : o[k + 2]]
        z[o[k] : o[k + 1]] = zk
    y = np.empty_like(x)
    for k, d in enumerate(chol.lowers):  # y = |L| z: block k gets |D_k| z_k + |S_(k-1)| z_(k-1)
        yk = np.abs(d) @ z[o[k] : o[k + 1]]
        if k:
            yk = yk + np.abs(chol.subs[k - 1]) @ z[o[k - 1] : o[k]]
        y[o[k] : o[k + 1]] = yk
    return y


def _neighbour_width(sizes: list[int]) -> int:
    """max_k (n_{k-1} + n_k): the most nonzero terms of one entry of L L' for a block-bidiagonal L."""
    return max(n + (sizes[k - 1] if k else 0) for k, n in enumerate(sizes))


@dataclass
class LmiForms:
    """F(0, T), the row sums of its absolute-value form, and the last factor-norm bound measured for it.

    F(rho, T) is F(0, T) with rho added to the input block's diagonal, bit for bit as `negated_lmi` forms it
    (block + rho I), and the row sums for rho are these plus |rho| on the input block's rows (a sum of the
    same terms in another order, which the (1 + gamma(n + 2)) factor of the forming error covers), so one
    LmiForms serves every rho. Only the row sums of the absolute form are kept: it is never factored.
    `factor_norm` (`factor_norm_bound` of the last factorisation) only chooses the next shift; the proof
    always uses the factor it has just computed."""

    f0: BlockTridiagonal
    abs_sums: np.ndarray
    factor_norm: float | None = None
    inner: int | None = None  # terms per entry, when not the network's widest layer (`lipsdp.reduced`)


def lmi_forms(net: Network, t: np.ndarray, eliminated: tuple[int, ...] = ()) -> LmiForms:
    """`LmiForms` of the LMI of `net` at multipliers t; with `eliminated` hidden layers (`lipsdp.reduced`,
    usable for t), of the equivalent reduced LMI F' over the other layers."""
    eliminated = usable(net, eliminated, t)
    if eliminated:
        red = Reduction(net, eliminated)
        return LmiForms(*red.forms(t), inner=red.inner)
    net = dense_weights(net)
    inner = max([most_per_column(w) for w in net.weights] + [1]) + 6  # nonzero terms of F_kk's product, + 6
    return LmiForms(negated_lmi(net, 0.0, t), _row_sums(negated_lmi(net, 0.0, t, absolute=True)), inner=inner)


def _with_rho(f0: BlockTridiagonal, rho: float) -> BlockTridiagonal:
    return BlockTridiagonal([add_to_diagonal(f0.diag[0].copy(), rho)] + f0.diag[1:], f0.upper)


def prove_positive_definite(
    net: Network,
    rho: float,
    t: np.ndarray,
    forms: LmiForms | None = None,
    headroom: float | None = None,
) -> float | None:
    """Prove F(rho, T) positive definite in exact arithmetic; return a proven lower bound on its smallest
    eigenvalue (> 0), or None if the proof does not go through.

    The shift c must exceed the rounding margin, which depends on the factor: c is chosen from the factor
    norm last measured for these forms (or, first, from the forming error alone), and when the factor
    just computed needs more, once more from it. At most two factorisations.

    `forms`: `lmi_forms(net, t)` when several rho are tried for one T. `headroom`: an estimate of
    lambda_min(F(rho, T)) (rho - rho*(T)); when the rounding margin is far above it the proof cannot
    succeed and the factorisation is skipped (a shortcut only: it never turns a failure into a proof)."""
    forms = lmi_forms(net, t) if forms is None else forms
    inner = forms.inner if forms.inner is not None else max(max(net.sizes), 1) + 6
    return prove_forms_positive_definite(forms, rho, inner, headroom)


def prove_forms_positive_definite(
    forms: LmiForms, rho: float, inner: int, headroom: float | None = None
) -> float | None:
    """`prove_positive_definite` for any formed block-tridiagonal F(0) (rho added to its first block) whose
    entries are inner products of at most `inner` terms each (the forming error g_{2 inner} |F|_abs)."""
    f = _with_rho(forms.f0, rho)
    abs_sums = forms.abs_sums.copy()
    abs_sums[: forms.f0.diag[0].shape[0]] += abs(rho)
    n = f.size
    g_form = gamma(2 * inner)
    e = g_form / (1.0 - g_form) * float(np.max(abs_sums)) * (1.0 + gamma(n + 2))
    g_chol = gamma(2 * _neighbour_width([d.shape[0] for d in f.diag]) + 2)
    g_chol = g_chol / (1.0 - g_chol)
    diag_f = np.concatenate([np.diag(d) for d in f.diag])
    if not np.all(np.isfinite(diag_f)) or not np.isfinite(e):
        return None
    fixed = e + UNIT_ROUNDOFF * float(np.max(np.abs(diag_f)))
    norm = forms.factor_norm
    shift = 2.0 * (fixed + g_chol * norm) if norm is not None else 4.0 * fixed
    for _ in range(2):
        shift = max(shift, 1e-300)
        if headroom is not None and shift > 4.0 * headroom:
            return None  # success needs lambda_min(F) above about shift / 2
        chol = f.cholesky(shift)
        if chol is None:
            log.debug("rho %.17g: the factorisation at shift %.3g broke down", rho, shift)
            return None
        norm = factor_norm_bound(chol)
        del chol  # only its norm is needed: never two factors alive at once (a deep net's is GBs)
        forms.factor_norm = norm
        if not math.isfinite(norm):
            return None
        slack = max(abs(x - shift) for x in (float(diag_f.max()), float(diag_f.min())))
        proven = shift - UNIT_ROUNDOFF * slack - g_chol * norm - e
        proven *= 1.0 - 1e-9  # cover the rounding of this very expression
        log.debug("rho %.17g: forming %.3g, factor %.3g, shift %.3g, proven %.3g", rho, e, g_chol * norm, shift, proven)
        if proven > 0:
            return proven
        shift = 2.0 * (fixed + g_chol * norm)
    return None


@dataclass(frozen=True)
class Certificate:
    """A proven bound L <= upper, with the rho and multipliers that prove it."""

    upper: float
    rho: float
    rho_estimate: float
    multipliers: np.ndarray
    min_eigenvalue_bound: float


def certify(net: Network, t: np.ndarray | None) -> Certificate | None:
    """Verified bound from multipliers t (one per hidden neuron); None if no proof could be made.

    The proof runs on the exactly balanced LMI (`lmi.Balancing`: a power-of-two diagonal congruence that
    gives every layer norm about 1 and then F(rho*, T) a diagonal of about 1), which keeps the norm-wise
    rounding margin small relative to the smallest eigenvalue on deep and ill-conditioned networks.

    Raising rho only makes the input block more definite. Where a hidden block is singular at the
    solver's T (the blocks of [-1, 1] slopes are decoupled, and a norm-preserving layer is exactly tight),
    T is also tried with layer k's multipliers raised by (1 + d)^(l - k): each hidden block then gains
    about d times its own multiplier term, at the price of a factor (1 + d)^l on rho."""
    t = np.zeros(0) if t is None else np.clip(np.asarray(t, dtype=np.float64).reshape(-1), 0.0, None)
    if not np.all(np.isfinite(t)) or t.size != net.n_neurons:
        return None
    # Lazily prepared variants: (T, equilibrated) as given first; T with hidden blocks inflated and F not
    # equilibrated by its diagonal (at an exactly tight LMI that diagonal cancels to ~0, and scaling it to
    # 1 blows up the terms whose rounding the proof must cover) only when the first fails.
    inflated = t * _layer_inflation(net, TIGHT_BLOCK_INFLATION) if net.depth else t
    recipes = [(t, True), (t, False), (inflated, True), (inflated, False)]
    balanced: dict[int, tuple | None] = {}  # per multiplier vector: shared by its two recipes
    prepared: dict[int, tuple | None] = {}
    forms: dict[int, LmiForms] = {}
    eliminated = usable(net, plan(net), t)
    if eliminated:  # the proof's copies of the weights (balanced, equilibrated) are sparse: CNN-sized
        net = sparse_weights(net)
    order = sum(n for k, n in enumerate(net.sizes[:-1]) if k not in eliminated)
    large = order >= LARGE_LMI_ORDER
    inflations = RHO_INFLATIONS[2:] if large else RHO_INFLATIONS
    # (inflation, recipe) in the order tried: the given T alone at the smallest rho, then every recipe at each
    # larger one. On a large LMI the given T first up to 1e-4 (the bound within 5e-5 of sqrt(rho*)): each
    # other recipe costs minutes and GBs of formed blocks there, and on CNNs a failure means that
    # lambda_min(F) grows slowly with rho, which the other recipes do not change (the cifar10_2_255-shaped
    # net's unscaled greedy T was proved at 1e-5 after failing at 1e-8 and 1e-6; scaled along its ray,
    # `reduced.along_ray`, it and the ConvBig-shaped net's are proved at the first try).
    schedule = [(inflations[0], 0)] + [(x, k) for x in inflations[1:] for k in range(len(recipes))]
    if large:
        first = [(x, 0) for x in inflations if x <= LARGE_FIRST_INFLATION]
        schedule = first + [step for step in schedule if step not in first]
    last = {k: i for i, (_, k) in enumerate(schedule)}
    for i, (inflation, k) in enumerate(schedule):
        t_k, equilibrate = recipes[k]
        if k not in prepared:
            if k // 2 not in balanced:
                balanced[k // 2] = _balanced(net, t_k, usable(net, eliminated, t_k))
            base = balanced[k // 2]
            prepared[k] = _equilibrated(*base) if equilibrate and base is not None else base
        if prepared[k] is not None:
            if k not in forms:
                forms[k] = lmi_forms(prepared[k][1], prepared[k][2], prepared[k][4])
            cert = _prove_at(net, *prepared[k][:4], inflation, forms[k])
            if cert is not None:
                return cert
        if i == last[k]:  # this recipe is done: its formed LMI and copies go (one alive at a time when large)
            forms.pop(k, None)
            prepared.pop(k, None)
            if k % 2:
                balanced.pop(k // 2, None)
    log.debug("certificate failed at every inflation")
    return None


# Relative step d of the per-layer multiplier inflation (1 + d)^(l - k) (see `certify`).
TIGHT_BLOCK_INFLATION = 1e-9


def _layer_inflation(net: Network, d: float) -> np.ndarray:
    """Per neuron: (1 + d)^(l - k) for the neurons of hidden layer k = 0..l-1."""
    return np.repeat((1.0 + d) ** (net.depth - np.arange(net.depth)), net.hidden_sizes)


def _balanced(net: Network, t: np.ndarray, eliminated: tuple[int, ...]):
    """(balancing, balanced network, balanced multipliers, rho*, eliminated layers) for the proof, or None."""
    bal = Balancing.of(net)
    net_b, t_b = bal.network(net), bal.multipliers(net, t)
    if not (np.all(np.isfinite(t_b)) and all(all_finite(w) for w in net_b.weights)):
        return None
    rho_star = reduced_schur_rho(net_b, t_b, eliminated)
    if rho_star is None:
        return None
    return bal, net_b, t_b, rho_star, eliminated


def _equilibrated(bal: Balancing, net_b: Network, t_b: np.ndarray, rho_star: float, eliminated: tuple[int, ...]):
    """The same, then F(rho*, T) itself equilibrated: every diagonal entry about 1 (exact powers of two)."""
    eq = Balancing.equilibrating(net_b, rho_star, t_b)
    t_eq = eq.multipliers(net_b, t_b)
    if not eq.is_identity() and np.array_equal(eq.original_multipliers(net_b, t_eq), t_b):
        bal, net_b, t_b = bal.then(eq), eq.network(net_b), t_eq
        rho_star = eq.balanced_rho(rho_star)
    return bal, net_b, t_b, rho_star, eliminated


def _prove_at(
    net: Network, bal, net_b: Network, t_b: np.ndarray, rho_star: float, inflation: float, forms=None
) -> Certificate | None:
    scale = max(rho_star, 1e-200)  # a zero network still needs rho > 0 for a strict proof
    rho_b = rho_star + inflation * scale
    proven = prove_positive_definite(net_b, rho_b, t_b, forms, headroom=rho_b - rho_star)
    if proven is None:
        return None
    rho = bal.original_rho(rho_b)  # exact: division by a power of two
    if not np.isfinite(rho) or rho <= 0:
        return None
    upper = math.nextafter(math.sqrt(rho), math.inf)
    # the multipliers actually proven (equal to t unless scaling them left the float64 range)
    t_proven = bal.original_multipliers(net, t_b)
    return Certificate(upper, rho, bal.original_rho(rho_star), t_proven, proven)


def certified_product(factors: list[float]) -> float:
    """Product of non-negative bounds, rounded upwards so the result is still an upper bound."""
    out = 1.0
    for x in factors:
        out = math.nextafter(out * x, math.inf) if out * x > 0 else out * x
    return out


def certify_or_repair(net: Network, t: np.ndarray | None) -> tuple[Certificate, str]:
    """Certify t; if that fails, mix t with the always-feasible layer-by-layer multipliers until it
    succeeds. Returns the certificate and a short note on what was done ('' when t itself worked)."""
    if t is not None:
        cert = certify(net, t)
        if cert is not None:
            return cert, ""
    try:
        eliminated = plan(net)
        anchor = reduced_multipliers(net, eliminated) if eliminated else sequential_multipliers(net)
        anchor = along_ray(net, anchor, eliminated)  # the greedy multipliers at their best scale
    except (np.linalg.LinAlgError, ValueError):
        anchor = None
    if anchor is not None and t is not None and np.all(np.isfinite(t)):
        t = np.clip(np.asarray(t, dtype=np.float64).reshape(-1), 0.0, None)
        theta = _best_mixing(net, t, anchor, plan(net))
        # The smallest rho may leave a hidden block only just definite (at an optimum whose hidden blocks
        # are singular, e.g. the decoupled blocks of [-1, 1] slopes, rho cannot help): more of the strictly
        # feasible anchor buys the margin the rounding-error proof needs.
        for mix in [] if theta is None else [theta] + [x for x in (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5) if x > theta]:
            cert = certify(net, (1.0 - mix) * t + mix * anchor)
            if cert is not None:
                return cert, f"solver multipliers repaired by mixing {mix:.2g} of the layer-by-layer ones"
    cert = certify(net, anchor) if anchor is not None else None
    if cert is None:
        from lipsdp.errors import VerificationError

        raise VerificationError(
            "no verified bound could be proved for this network (even the layer-by-layer multipliers "
            "failed); the weights may be too extreme: try rescaling them or method='naive'"
        )
    return cert, "solver multipliers unusable; fell back to the layer-by-layer multipliers"


def _best_mixing(net: Network, t: np.ndarray, anchor: np.ndarray, eliminated: tuple[int, ...]) -> float | None:
    """The theta in (0, 1] minimising rho*((1 - theta) t + theta anchor).

    rho* is convex in T and the anchor is strictly feasible, so rho* along the segment is convex where
    finite: a coarse log grid locates the minimum, a golden-section search on log theta refines it."""
    from scipy.optimize import minimize_scalar

    def rho_at(log_theta: float) -> float:
        theta = float(np.exp(log_theta))
        value = reduced_schur_rho(net, (1.0 - theta) * t + theta * anchor, eliminated)
        return 1e300 if value is None else value  # finite, so the scalar search stays warning-free

    grid = np.linspace(np.log(1e-9), 0.0, 28)
    values = [rho_at(g) for g in grid]
    i = int(np.argmin(values))
    if values[i] >= 1e300:
        return None
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(rho_at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-3})
    best = res.x if res.fun < values[i] else grid[i]
    return float(np.exp(best))
