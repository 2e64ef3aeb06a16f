"""LipSDP-Neuron and LipSDP-Layer as semidefinite programs through CVXPY (Clarabel, SCS or MOSEK).

Minimise rho subject to F(rho, T) = -M(rho, T) >= 0 (see `lipsdp.lmi`). The solver's multipliers are then
certified (`lipsdp.certificate`): the reported bound is verified, the solver's own sqrt(rho) is kept as `raw`.
"""

from __future__ import annotations

import logging

import numpy as np

from lipsdp.errors import SolverError
from lipsdp.methods import MethodOutput, verified_output
from lipsdp.network import Network
from lipsdp.solvers import cvxpy_solver

log = logging.getLogger(__name__)


def _formulate(net: Network, per_neuron: bool):
    import cvxpy as cp

    rho = cp.Variable(name="rho")
    if per_neuron:
        ts = [cp.Variable(n, nonneg=True, name=f"t{k + 1}") for k, n in enumerate(net.hidden_sizes)]
    else:
        lams = [cp.Variable(nonneg=True, name=f"lambda{k + 1}") for k in range(net.depth)]
        ts = [lam * np.ones(n) for lam, n in zip(lams, net.hidden_sizes)]
    l = net.depth
    sizes = net.sizes[:-1]
    blocks = [[np.zeros((sizes[i], sizes[j])) for j in range(l + 1)] for i in range(l + 1)]
    for k in range(l + 1):
        w = net.weights[k]
        if k < l:
            ab = 2.0 * net.alphas[k] * net.betas[k]
            diag = w.T @ cp.diag(cp.multiply(ab, ts[k])) @ w if np.any(ab) else 0
            upper = -(w.T @ cp.diag(cp.multiply(net.alphas[k] + net.betas[k], ts[k])))
            blocks[k][k + 1] = upper
            blocks[k + 1][k] = upper.T
        else:
            diag = -(w.T @ w)
        if k == 0:
            diag = diag + rho * np.eye(sizes[0])
        else:
            diag = diag + 2.0 * cp.diag(ts[k - 1])
        blocks[k][k] = diag
    f = cp.bmat(blocks)
    problem = cp.Problem(cp.Minimize(rho), [0.5 * (f + f.T) >> 0])
    return problem, rho, ts


# Largest LMI (sum of the layer widths except the output) the dense CVXPY path accepts by default: its
# cost grows like n^4 or worse in memory and time (Clarabel's dense PSD cone), so bigger problems are
# refused up front with advice instead of exhausting memory. Override with `max_lmi_size=`.
MAX_CVXPY_LMI = 400
_TIME_LIMIT_KEYS = {"clarabel": "time_limit", "scs": "time_limit_secs"}


def _solver_options(solver_name: str, time_limit: float | None) -> dict:
    """CVXPY keyword arguments that give the chosen solver a wall-clock limit in seconds."""
    if time_limit is None:
        return {}
    if not time_limit > 0:
        raise SolverError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if solver_name == "mosek":
        return {"mosek_params": {"MSK_DPAR_OPTIMIZER_MAX_TIME": float(time_limit)}}
    return {_TIME_LIMIT_KEYS[solver_name]: float(time_limit)}


def _solve(
    net: Network,
    per_neuron: bool,
    solver: str | None,
    name: str,
    time_limit: float | None = None,
    max_lmi_size: int = MAX_CVXPY_LMI,
) -> MethodOutput:
    import cvxpy as cp

    solver_name, constant = cvxpy_solver(solver)
    if net.depth == 0:
        from lipsdp.methods.naive import naive

        out = naive(net)
        out.notes.append("linear network: the bound is the spectral norm, no SDP needed")
        return out
    size = int(sum(net.sizes[:-1]))
    if size > max_lmi_size:
        raise SolverError(
            f"the {name} LMI would be {size} x {size}, above the limit of {max_lmi_size} for the dense CVXPY "
            "path (its memory and time grow like n^4); use method='sequential' (linear cost in depth), "
            "split=K, the default solver (structured interior point), or pass max_lmi_size= to try anyway"
        )
    problem, rho, ts = _formulate(net, per_neuron)
    notes = []
    try:
        problem.solve(solver=constant, **_solver_options(solver_name, time_limit))
        status = str(problem.status)
    except cp.error.SolverError as exc:
        # No multipliers: the layer-by-layer ones still give a verified (looser) bound; notes say so.
        log.warning("%s failed on the %s SDP: %s", solver_name, name, exc)
        status = "solver_error"
        notes.append(f"{solver_name} failed ({exc}); the bound comes from the layer-by-layer multipliers")
    if status in ("infeasible", "unbounded", "infeasible_inaccurate", "unbounded_inaccurate"):
        notes.append(f"solver reported '{status}' (LipSDP is always feasible: a numerical failure)")
    t = None
    if rho.value is not None and all(
        np.all(np.isfinite(np.asarray(x.value))) for x in ts if x.value is not None
    ):
        try:
            t = np.concatenate([np.asarray(x.value, dtype=np.float64).reshape(-1) for x in ts])
        except (TypeError, ValueError):
            t = None
    raw = float(np.sqrt(max(float(rho.value), 0.0))) if rho.value is not None else float("nan")
    if status not in ("optimal",):
        notes.append(f"solver status: {status}")
    return verified_output(net, t, raw, status, solver_name, notes)


LINEAR_RELAX = 1e-4


def _widen_linear_neurons(net: Network) -> tuple[Network, int]:
    """Neurons with alpha == beta (exactly linear, e.g. always-on on a region) make the optimal multiplier
    unbounded, which stalls an interior-point method. Widening their slope interval slightly keeps every
    bound sound (the true slope stays inside) and costs a relative ~1e-4 in tightness."""
    count = sum(int(np.sum(a == b)) for a, b in zip(net.alphas, net.betas))
    if count == 0:
        return net, 0
    alphas = [
        np.where(a == b, b - LINEAR_RELAX * np.maximum(np.abs(b), 1e-300), a)
        for a, b in zip(net.alphas, net.betas)
    ]
    return net.with_slopes(alphas, net.betas), count


# A bound whose proven distance to the LipSDP optimum (upper / sdp_lower - 1) is at most this is reported
# with status "optimal".
OPTIMAL_GAP = 1e-4


def _solve_structured(net: Network, per_neuron: bool, time_limit: float | None) -> MethodOutput:
    """The structured interior point, then the best verified candidate: the solver's multipliers or the
    layer-by-layer ones it started from (so the result is never looser than `sequential`), with the
    proven lower bound on the optimum from the solver's dual iterate."""
    from lipsdp import eliminate
    from lipsdp.heap import retained_heap

    if eliminate.applies(net):  # one very wide hidden layer: the dense interior point cannot hold its LMI
        if per_neuron:
            from lipsdp.errors import SolverError

            raise SolverError(
                f"LipSDP-Neuron's interior point needs the LMI of order {net.sizes[0] + net.sizes[1]}, too large for "
                f"this network's hidden layer of {net.sizes[1]} neurons; use method='anytime' (per-neuron "
                "multipliers on the LMI with that layer eliminated) or method='layer' (its exact optimum)"
            )
        from lipsdp.methods.sequential import sequential

        out = sequential(net)  # for one hidden layer, the best single multiplier is LipSDP-Layer's optimum
        out.notes.insert(0, "LipSDP-Layer's optimum by a 1-D convex search on the reduced LMI")
        return out
    with retained_heap():  # solver, certificates and the sequential candidate reuse their temporaries
        return _structured_candidates(net, per_neuron, time_limit)


def _structured_candidates(net: Network, per_neuron: bool, time_limit: float | None) -> MethodOutput:
    from lipsdp.methods.ipm import solve_lipsdp_ipm
    from lipsdp.methods.sequential import sequential

    if net.depth == 0:
        from lipsdp.methods.naive import naive

        return naive(net)
    net, widened = _widen_linear_neurons(net)
    res = solve_lipsdp_ipm(net, per_neuron=per_neuron, time_limit=time_limit)
    notes = []
    if widened:
        notes.append(
            f"{widened} exactly linear neurons given slopes [b - {LINEAR_RELAX:g}|b|, b] for the solver"
        )
    raw = float(np.sqrt(max(res.rho, 0.0))) if np.isfinite(res.rho) else float("nan")
    out = verified_output(net, res.multipliers if np.isfinite(res.rho) else None, raw, res.status, "lipsdp-ipm", notes)
    anchor = sequential(net)  # the layer-by-layer multipliers (or the naive product, where tighter)
    if anchor.upper < out.upper:
        out.upper, out.multipliers, out.proof = anchor.upper, anchor.multipliers, anchor.proof
        out.notes.insert(0, "the layer-by-layer bound (sequential) was the tighter verified bound")
    # The lower bound is for the LMI actually solved; widened slopes make that LMI's optimum larger than
    # the network's, so it is not reported then.
    if res.rho_lower is not None and not widened:
        out.sdp_lower = float(np.sqrt(res.rho_lower)) * (1.0 - 2.0**-52)
        if out.sdp_lower > out.upper * (1 + 1e-9):
            from lipsdp.errors import VerificationError

            raise VerificationError(
                f"internal inconsistency: the proven SDP lower bound {out.sdp_lower} exceeds the verified upper "
                f"bound {out.upper}; please report this network"
            )
        out.sdp_lower = min(out.sdp_lower, out.upper)
    gap = out.upper / out.sdp_lower - 1.0 if out.sdp_lower else None
    out.status = "optimal" if gap is not None and gap <= OPTIMAL_GAP else (
        res.status if res.status != "optimal" else "not_proven")
    if out.status != "optimal":
        out.notes.append(
            f"interior-point status: {res.status} after {res.iterations} iterations"
            + (f"; proven within {gap:.2%} of the optimum" if gap is not None else "; no proven distance to the optimum")
            + " (bound still verified)"
        )
    return out


def lipsdp_layer(
    net: Network, *, solver: str | None = None, time_limit: float | None = None, **_: object
) -> MethodOutput:
    """LipSDP-Layer (one multiplier per hidden layer). Verified upper bound.

    solver=None or 'ipm' uses the structured interior-point solver; 'clarabel', 'scs', 'mosek' go through CVXPY."""
    if solver in (None, "ipm"):
        return _solve_structured(net, per_neuron=False, time_limit=time_limit)
    extra = {"max_lmi_size": _["max_lmi_size"]} if "max_lmi_size" in _ else {}
    return _solve(net, per_neuron=False, solver=solver, name="LipSDP-Layer", time_limit=time_limit, **extra)


def lipsdp_neuron_dense(
    net: Network, *, solver: str | None = None, time_limit: float | None = None, **opts: object
) -> MethodOutput:
    """LipSDP-Neuron in its direct dense CVXPY form (one multiplier per neuron). Verified upper bound.
    `time_limit` (s) goes to the solver; `max_lmi_size` overrides the size refusal (`MAX_CVXPY_LMI`)."""
    extra = {"max_lmi_size": opts["max_lmi_size"]} if "max_lmi_size" in opts else {}
    return _solve(net, per_neuron=True, solver=solver, name="LipSDP-Neuron", time_limit=time_limit, **extra)


def lipsdp_neuron(
    net: Network, *, solver: str | None = None, time_limit: float | None = None, **opts: object
) -> MethodOutput:
    """LipSDP-Neuron, exact optimum, by the fastest exact path. Verified upper bound.

    By default (solver=None or 'ipm') the structured interior-point solver (`methods.ipm`), which exploits
    the rank-2 structure of each neuron's constraint; a named conic solver ('clarabel', 'scs', 'mosek')
    solves the direct dense formulation through CVXPY instead (as `neuron-dense`)."""
    if solver in (None, "ipm"):
        return _solve_structured(net, per_neuron=True, time_limit=time_limit)
    return lipsdp_neuron_dense(net, solver=solver, time_limit=time_limit, **opts)
