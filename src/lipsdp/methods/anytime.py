"""Anytime first-order LipSDP-Neuron: optimise the multipliers directly on the exact bound rho*(T).

For any T >= 0 whose hidden block R(T) is positive definite, rho*(T) = -lambda_min of the Schur complement
(see `lipsdp.lmi`) is a valid bound, and it is convex in T. So we run Adam on log t (keeping t > 0)
against rho*(T), computed by the block recursion in torch (autograd through Cholesky solves and the
symmetric eigensolver), on CPU or GPU. Every iterate is a bound; the best one seen is certified in
float64 by `lipsdp.certificate` and returned, so stopping at any time (`budget` seconds, `steps`) still
yields a verified answer. Warm start: the layer-by-layer multipliers (`lmi.sequential_multipliers`).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from lipsdp.lmi import Balancing, schur_rho, sequential_multipliers
from lipsdp.methods import MethodOutput, verified_output
from lipsdp.network import Network

log = logging.getLogger(__name__)


def _rho_torch(weights, alphas, betas, log_t, sizes):
    """rho*(T) in torch; returns None-equivalent (inf) when a Cholesky fails."""
    import torch

    t_all = torch.exp(log_t)
    ts = torch.split(t_all, sizes)
    depth = len(sizes)
    # backward recursion: D_l = 2 T_l - W_l'W_l; D_k = F_kk - U_k D_{k+1}^-1 U_k'
    wl = weights[-1]
    d = torch.diag(2.0 * ts[-1]) - wl.T @ wl
    s = None
    for k in range(depth, 0, -1):
        chol, info = torch.linalg.cholesky_ex(d)
        if int(info) != 0:
            return None
        w = weights[k - 1]
        t = ts[k - 1]
        u = -(w.T * ((alphas[k - 1] + betas[k - 1]) * t)[None, :])  # block (k-1, k)
        v = torch.cholesky_solve(u.T, chol)
        reduced = u @ v
        ab = 2.0 * alphas[k - 1] * betas[k - 1] * t
        base = w.T @ (ab[:, None] * w)
        if k > 1:
            d = torch.diag(2.0 * ts[k - 2]) + base - reduced
        else:
            s = base - reduced
    s = 0.5 * (s + s.T)
    return -torch.linalg.eigvalsh(s)[0]


def anytime(
    net: Network,
    *,
    budget: float = 30.0,
    steps: int = 2000,
    lr: float = 0.2,
    device: str | None = None,
    seed: int = 0,
    tol: float = 1e-7,
    **_: object,
) -> MethodOutput:
    """First-order LipSDP-Neuron within a time `budget` (seconds). Verified upper bound (anytime).

    device: 'cpu', 'cuda', or None for CUDA when available. The result is at least as tight as the
    layer-by-layer bound it starts from, and approaches the LipSDP-Neuron optimum with more budget."""
    import torch

    start = time.perf_counter()
    if net.depth == 0:
        from lipsdp.methods.naive import naive

        return naive(net)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    bal = Balancing.of(net)
    net_b = bal.network(net)
    t0 = bal.multipliers(net, sequential_multipliers(net))
    best_t = t0.copy()
    best_rho = schur_rho(net_b, t0)
    if best_rho is None:
        best_rho = np.inf
    kw = {"dtype": torch.float64, "device": device}
    weights = [torch.as_tensor(w, **kw) for w in net_b.weights]
    alphas = [torch.as_tensor(a, **kw) for a in net_b.alphas]
    betas = [torch.as_tensor(b, **kw) for b in net_b.betas]
    sizes = net_b.hidden_sizes
    log_t = torch.tensor(np.log(np.maximum(t0, 1e-300)), requires_grad=True, **kw)
    # Small blocks run faster on one thread (and multi-threaded torch degrades badly on a busy machine).
    threads = torch.get_num_threads()
    if device == "cpu" and max(net.sizes) <= 256:
        torch.set_num_threads(1)
    try:
        best_t, best_rho, done = _descend(
            weights, alphas, betas, log_t, sizes, best_t, best_rho, budget, steps, lr, tol, start, kw
        )
    finally:
        torch.set_num_threads(threads)
    log.info("anytime: %d steps, rho %.6g, %.1fs on %s", done, best_rho, time.perf_counter() - start, device)
    raw = float(np.sqrt(bal.original_rho(best_rho))) if np.isfinite(best_rho) else float("nan")
    notes = [f"{done} first-order steps on {device}"]
    return verified_output(net, bal.original_multipliers(net, best_t), raw, "ok", f"torch-{device}", notes)


def _descend(weights, alphas, betas, log_t, sizes, best_t, best_rho, budget, steps, lr, tol, start, kw):
    """Adam on log t against rho*(T); returns the best multipliers, their rho and the steps taken."""
    import torch

    opt = torch.optim.Adam([log_t], lr=lr)
    step_lr = lr
    done = 0
    stalled = 0

    def restart_from_best(new_lr: float) -> None:
        """Go back to the best multipliers with a smaller step and a fresh Adam state."""
        with torch.no_grad():
            log_t.copy_(torch.as_tensor(np.log(np.maximum(best_t, 1e-300)), **kw))
        for group in opt.param_groups:
            group["lr"] = new_lr
        opt.state.clear()

    for done in range(1, steps + 1):
        if time.perf_counter() - start > budget:
            break
        rho = _rho_torch(weights, alphas, betas, log_t, sizes)
        if rho is None or not torch.isfinite(rho):
            # left the region where R(T) > 0: go back to the best point with a smaller step
            step_lr *= 0.5
            restart_from_best(step_lr)
            if step_lr < 1e-6:
                break
            continue
        value = float(rho.detach())
        if value < best_rho * (1.0 - tol):
            stalled = 0
        else:
            stalled += 1
        if value < best_rho:
            best_rho = value
            best_t = torch.exp(log_t).detach().cpu().numpy().copy()
        if stalled > 60:
            # no progress: restart from the best point with half the step
            step_lr *= 0.5
            restart_from_best(step_lr)
            stalled = 0
            if step_lr < 1e-4:
                break
            continue
        opt.zero_grad()
        rho.backward()
        opt.step()
    return best_t, best_rho, done
