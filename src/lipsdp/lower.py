"""Lower bounds: the largest Jacobian spectral norm ||J_f(x)||_2 found at real inputs.

Any differentiable point x gives L >= ||J_f(x)||_2, so every value returned here is a true lower bound
(up to float rounding of the norm itself). Search: random inputs at several scales, then gradient ascent
on ||J||_2. For piecewise-linear activations the exact Jacobian is locally constant, so the ascent steps
follow a smoothed surrogate (softplus-type, sharpening over the run) while every reported value is the
exact Jacobian norm of the real network at a real point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lipsdp.activations import Mixed, Reflect
from lipsdp.network import Network, activation_parts
from lipsdp.weights import is_sparse


@dataclass(frozen=True)
class LowerBound:
    """`value` = ||J_f(x)||_2 at `point`, the best found."""

    value: float
    point: np.ndarray


def _torch_activation(name: str, param: float | None, h, smooth: float | None):
    import torch
    import torch.nn.functional as F

    if name == "relu":
        return F.softplus(h, beta=smooth) if smooth else torch.relu(h)
    if name == "leaky_relu":
        if smooth:
            return param * h + (1.0 - param) * F.softplus(h, beta=smooth)
        return F.leaky_relu(h, param)
    if name == "tanh":
        return torch.tanh(h)
    if name == "sigmoid":
        return torch.sigmoid(h)
    if name == "softplus":
        return F.softplus(h)
    if name == "elu":
        return F.elu(h, alpha=param)
    if name == "identity":
        return h
    if name == "abs":
        # smoothed: softplus(x) + softplus(-x) = |x| + (2 / smooth) log(1 + e^(-smooth |x|)), slope tanh(smooth x / 2)
        return F.softplus(h, beta=smooth) + F.softplus(-h, beta=smooth) if smooth else torch.abs(h)
    raise ValueError(f"no torch implementation for activation {name}")


# A weight with at most this fraction of nonzeros (and at least SPARSE_MIN_SIZE entries) is multiplied as a
# sparse matrix: lowered convolutions and max-pool comparators are mostly zeros (Convnet_maxpool's 9216 x 9816
# comparator layer has a few nonzeros per row), and dense products of them made the search take minutes.
SPARSE_DENSITY, SPARSE_MIN_SIZE = 0.05, 1 << 16


class TorchChain:
    """The chain in torch, on inputs stored as columns (n_0, batch): each weight dense or sparse, each
    activation elementwise (so its derivative is the gradient of its sum)."""

    def __init__(self, net: Network) -> None:
        import torch

        self.weights, self.transposes = [], []
        for w in net.weights:
            if not is_sparse(w) and w.size >= SPARSE_MIN_SIZE and np.count_nonzero(w) <= SPARSE_DENSITY * w.size:
                w = sp.coo_array(w)
            if is_sparse(w):  # a sparse tensor from the nonzeros, no dense copy
                coo = sp.coo_array(w)
                index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
                t = torch.sparse_coo_tensor(index, torch.from_numpy(coo.data), w.shape, check_invariants=True)
                t = t.coalesce()
                self.weights.append(t)
                self.transposes.append(t.t().coalesce())  # no dense transposed copy
            else:
                t = torch.from_numpy(w)
                self.weights.append(t)
                self.transposes.append(t.T)
        self.biases = [torch.from_numpy(b)[:, None] for b in net.biases]
        self.parts = [[] if isinstance(a, Reflect) else activation_parts(a.base if isinstance(a, Mixed) else a)
                      for a in net.activations]  # parts in order
        # Pass-through neurons of Mixed layers keep their pre-activation; a Reflect layer's |.| neurons are flipped.
        self.passing = [torch.from_numpy(a.mask())[:, None] if isinstance(a, Mixed) else None for a in net.activations]
        self.flipping = [torch.from_numpy(a.mask())[:, None] if isinstance(a, Reflect) else None for a in net.activations]

    def activate(self, k: int, z, smooth: float | None):
        import torch

        h = z
        for part in self.parts[k]:
            h = _torch_activation(part.name, part.param, h, smooth)
        if self.passing[k] is not None:
            h = torch.where(self.passing[k], z, h)
        if self.flipping[k] is not None:
            h = torch.where(self.flipping[k], _torch_activation("abs", None, h, smooth), h)
        return h

    def jacobians(self, x, smooth: float | None):
        """J_f at each column of x, as a (batch, n_out, n_0) tensor; differentiable in x when x requires it.

        J = W_l D_(l-1) W_(l-1) ... D_0 W_0 with D_k the activation's derivative at the pre-activations,
        accumulated from the output side on all samples at once (n_out columns per sample)."""
        import torch

        h, slopes = x, []
        for k in range(len(self.weights) - 1):
            z = self.weights[k] @ h + self.biases[k]
            with torch.enable_grad():
                zz = z if z.requires_grad else z.detach().requires_grad_()
                y = self.activate(k, zz, smooth)
                (d,) = torch.autograd.grad(y.sum(), zz, create_graph=z.requires_grad)
            slopes.append(d)
            h = y if z.requires_grad else y.detach()
        batch = x.shape[1]
        m = self.weights[-1].shape[0]
        g = self.transposes[-1].to_dense() if self.transposes[-1].is_sparse else self.transposes[-1]
        g = g[:, None, :].expand(-1, batch, -1)  # (n_l, batch, n_out)
        for k in range(len(self.weights) - 2, -1, -1):
            g = (slopes[k][:, :, None] * g).reshape(g.shape[0], batch * m)
            g = (self.transposes[k] @ g).reshape(-1, batch, m)
        return g.permute(1, 2, 0)


def jacobian_norms(net: Network, points: np.ndarray) -> np.ndarray:
    """Exact ||J_f(x)||_2 for each row x of `points`."""
    return _norms(TorchChain(net), points)


def _norms(chain: TorchChain, points: np.ndarray) -> np.ndarray:
    import torch

    x = torch.as_tensor(np.atleast_2d(points), dtype=torch.float64).T
    with torch.no_grad():
        return torch.linalg.matrix_norm(chain.jacobians(x, None), ord=2).numpy()


def lower_bound(
    net: Network, *, samples: int = 512, steps: int = 100, seed: int = 0, region=None
) -> LowerBound:
    """Largest ||J_f(x)||_2 found by sampling `samples` points and `steps` of gradient ascent.

    `region` (an object with `sample(n, rng)` and `project(x)`) restricts the search to an input set.
    Reproducible for a given seed.
    """
    import torch

    rng = np.random.default_rng(seed)
    n0 = net.sizes[0]
    if region is None:
        scales = np.exp(rng.uniform(np.log(0.05), np.log(5.0), size=(samples, 1)))
        x0 = rng.standard_normal((samples, n0)) * scales
    else:
        x0 = region.sample(samples, rng)
    layers = TorchChain(net)
    norms = _norms(layers, x0)
    best_i = int(np.argmax(norms))
    best = LowerBound(float(norms[best_i]), x0[best_i].copy())
    if steps <= 0 or net.depth == 0:
        return best
    top = np.argsort(norms)[::-1][: max(1, min(64, samples))]
    torch.manual_seed(seed)
    x = torch.tensor(x0[top], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05 * float(np.mean(np.abs(x0)) + 1e-3))
    piecewise = any((a.base if isinstance(a, Mixed) else a).name in ("relu", "leaky_relu", "abs", "reflect")
                    for a in net.activations)
    for step in range(steps):
        sharpness = 5.0 * (200.0 / 5.0) ** (step / max(steps - 1, 1)) if piecewise else None
        jac = layers.jacobians(x.T, sharpness)
        loss = -torch.linalg.matrix_norm(jac, ord=2).sum()
        if not loss.requires_grad:  # the Jacobian does not depend on x (all-identity net): nothing to ascend
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        if region is not None:
            with torch.no_grad():
                x.copy_(torch.as_tensor(region.project(x.detach().numpy())))
        if step % 10 == 9 or step == steps - 1:
            pts = x.detach().numpy()
            vals = _norms(layers, pts)
            i = int(np.argmax(vals))
            if vals[i] > best.value:
                best = LowerBound(float(vals[i]), pts[i].copy())
    return best
