"""LipSDP-Neuron and LipSDP-Layer as semidefinite programs through CVXPY (Clarabel, SCS or MOSEK).

Minimise rho subject to F(rho, T) = -M(rho, T) >= 0 (see `lipsdp.lmi`). The solver's multipliers are then
certified (`lipsdp.certify`): the reported bound is verified, the solver's own sqrt(rho) is kept as `raw`.
"""

from __future__ import annotations

import logging

import numpy as np

from lipsdp.certify import certify_or_repair
from lipsdp.errors import SolverError
from lipsdp.methods import MethodOutput
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


def _solve(net: Network, per_neuron: bool, solver: str | None, name: str) -> MethodOutput:
    import cvxpy as cp

    solver_name, constant = cvxpy_solver(solver)
    if net.depth == 0:
        from lipsdp.methods.naive import naive

        out = naive(net)
        out.notes.append("linear network: the bound is the spectral norm, no SDP needed")
        return out
    problem, rho, ts = _formulate(net, per_neuron)
    try:
        problem.solve(solver=constant)
    except cp.error.SolverError as exc:
        raise SolverError(f"{solver_name} failed on the {name} SDP ({exc}); try solver='scs' or method='sequential'") from None
    status = str(problem.status)
    t = None
    if rho.value is not None and all(np.all(np.isfinite(np.asarray(x.value))) for x in ts if x.value is not None):
        try:
            t = np.concatenate([np.asarray(x.value, dtype=np.float64).reshape(-1) for x in ts])
        except (TypeError, ValueError):
            t = None
    raw = float(np.sqrt(max(float(rho.value), 0.0))) if rho.value is not None else float("nan")
    cert, note = certify_or_repair(net, t)
    notes = [note] if note else []
    if status not in ("optimal",):
        notes.append(f"solver status: {status}")
    return MethodOutput(cert.upper, raw, status, "lmi-cholesky", cert.multipliers, notes, solver_name)


def lipsdp_layer(net: Network, *, solver: str | None = None, **_: object) -> MethodOutput:
    """LipSDP-Layer (one multiplier per hidden layer). Verified upper bound."""
    return _solve(net, per_neuron=False, solver=solver, name="LipSDP-Layer")


def lipsdp_neuron_dense(net: Network, *, solver: str | None = None, **_: object) -> MethodOutput:
    """LipSDP-Neuron in its direct dense CVXPY form (one multiplier per neuron). Verified upper bound."""
    return _solve(net, per_neuron=True, solver=solver, name="LipSDP-Neuron")


def lipsdp_neuron(net: Network, *, solver: str | None = None, **opts: object) -> MethodOutput:
    """LipSDP-Neuron, exact optimum, by the fastest available exact path. Verified upper bound."""
    return lipsdp_neuron_dense(net, solver=solver, **opts)
