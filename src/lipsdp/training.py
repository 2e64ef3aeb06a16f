"""Seeded training of small ReLU classifiers, normal or adversarial (FGSM / PGD), and the attacks themselves.

Used by `lipsdp.reproduce` to rebuild the paper's trained-classifier experiments. Everything runs in float64
on the CPU under `deterministic(seed)` (one thread, deterministic kernels), so the same seed gives the same
weights bit for bit on the same machine. The attacks give *empirical* robustness only (an upper bound on
the accuracy any certificate can prove), never a guarantee.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from lipsdp.errors import LipSDPError

log = logging.getLogger(__name__)

NORMS = ("l2", "linf")
ATTACKS = ("fgsm", "pgd")


def _torch():
    import torch

    return torch


@contextmanager
def deterministic(seed: int, threads: int = 1) -> Iterator[Any]:
    """Seed torch, run on `threads` threads with deterministic kernels; restore the previous settings after.

    Yields a `torch.Generator` seeded with `seed` for any further random draws.
    """
    torch = _torch()
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_state = torch.random.get_rng_state()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
        torch.random.set_rng_state(prev_state)


def mlp(sizes: Sequence[int], activation: str = "relu") -> Any:
    """A float64 `nn.Sequential` of Linear layers with `activation` between them (sizes = [n_0, ..., n_out])."""
    torch = _torch()
    nn = torch.nn
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise LipSDPError(f"an MLP needs at least an input and an output size, all positive; got {list(sizes)}")
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise LipSDPError(f"unknown activation '{activation}'; choose one of {', '.join(acts)}")
    layers: list[Any] = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(int(sizes[k]), int(sizes[k + 1])))
        if k < len(sizes) - 2:
            layers.append(acts[activation]())
    return nn.Sequential(*layers).double()


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise LipSDPError(f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")


def _as_tensors(x: Any, y: Any) -> tuple[Any, Any]:
    torch = _torch()
    return torch.as_tensor(np.asarray(x), dtype=torch.float64), torch.as_tensor(np.asarray(y), dtype=torch.long)


def _loss(logits: Any, y: Any, kind: str) -> Any:
    """Per-sample loss the attacker increases: cross-entropy, or the negative logit margin (Carlini-Wagner)."""
    torch = _torch()
    if kind == "ce":
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return other.max(dim=1).values - true


def _step(grad: Any, norm: str) -> Any:
    """Steepest-ascent direction of unit `norm`."""
    torch = _torch()
    if norm == "linf":
        return grad.sign()
    flat = grad.reshape(len(grad), -1)
    return grad / torch.clamp(flat.norm(dim=1), min=1e-30).reshape(-1, *([1] * (grad.dim() - 1)))


def _project(delta: Any, eps: float, norm: str) -> Any:
    """Project perturbations onto the `norm` ball of radius eps."""
    torch = _torch()
    if norm == "linf":
        return torch.clamp(delta, -eps, eps)
    n = delta.reshape(len(delta), -1).norm(dim=1).reshape(-1, *([1] * (delta.dim() - 1)))
    return delta * torch.clamp(eps / torch.clamp(n, min=1e-30), max=1.0)


def fgsm(model: Any, x: Any, y: Any, eps: float, norm: str = "linf") -> Any:
    """Fast gradient (sign) method: one step of size eps along the loss gradient (Goodfellow et al. 2015)."""
    _check_norm(norm)
    torch = _torch()
    x = x.detach().clone().requires_grad_(True)
    loss = _loss(model(x), y, "ce").sum()
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * _step(grad, norm)).detach()


def pgd(
    model: Any,
    x: Any,
    y: Any,
    eps: float,
    norm: str = "linf",
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    loss: str = "ce",
    generator: Any = None,
) -> tuple[Any, Any]:
    """Projected gradient ascent on the loss inside the `norm` ball of radius eps (Madry et al. 2018).

    Returns (x_adv, fooled): the last iterate, and a bool tensor marking samples misclassified at *any*
    iterate (the attack's success, which the last iterate alone can understate).
    """
    _check_norm(norm)
    torch = _torch()
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    delta = torch.zeros_like(x)
    if random_start:
        delta = _project((torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps, eps, norm)
    fooled = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x + delta)
        fooled |= (logits.argmax(dim=1) != y).detach()
        (grad,) = torch.autograd.grad(_loss(logits, y, loss).sum(), delta)
        delta = _project(delta.detach() + alpha * _step(grad, norm), eps, norm)
    with torch.no_grad():
        fooled |= model(x + delta).argmax(dim=1) != y
    return (x + delta).detach(), fooled


def train_classifier(
    x: np.ndarray,
    y: np.ndarray,
    hidden: Sequence[int],
    *,
    attack: str | None = None,
    eps: float = 0.0,
    norm: str = "linf",
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-2,
    pgd_steps: int = 7,
    seed: int = 0,
) -> Any:
    """Train a ReLU MLP [n_0, *hidden, n_classes] with Adam on (x, y); deterministic for a given seed.

    attack=None: ordinary training. 'fgsm': half clean, half FGSM examples (Goodfellow et al.).
    'pgd': PGD examples only (Madry et al.), `pgd_steps` steps with a random start. `eps` is the
    attack radius in `norm`, in the units of x.
    """
    if attack is not None and attack not in ATTACKS:
        raise LipSDPError(f"unknown attack '{attack}'; choose one of {', '.join(ATTACKS)} or None")
    if attack is not None and not eps > 0:
        raise LipSDPError(f"adversarial training needs a positive eps, got {eps}")
    _check_norm(norm)
    torch = _torch()
    x_t, y_t = _as_tensors(x, y)
    n_classes = int(y_t.max()) + 1
    with deterministic(seed) as gen:
        model = mlp([x_t.shape[1], *hidden, n_classes])
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for epoch in range(epochs):
            order = torch.randperm(len(x_t), generator=gen)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                xb, yb = x_t[idx], y_t[idx]
                if attack == "fgsm":
                    xb = torch.cat([xb, fgsm(model, xb, yb, eps, norm)])
                    yb = torch.cat([yb, yb])
                elif attack == "pgd":
                    xb, _ = pgd(model, xb, yb, eps, norm, steps=pgd_steps, generator=gen)
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch == epochs - 1:
                log.info("trained %s (attack=%s, eps=%g): final loss %.4f", list(hidden), attack, eps, loss.item())
    model.eval()
    return model


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of (x, y) the model classifies correctly."""
    torch = _torch()
    x_t, y_t = _as_tensors(x, y)
    with torch.no_grad():
        return float((model(x_t).argmax(dim=1) == y_t).double().mean())


def attacked_accuracy(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    norm: str = "l2",
    *,
    steps: int = 50,
    restarts: int = 2,
    seed: int = 0,
) -> float:
    """Accuracy left after a PGD attack of radius eps (margin loss, random restarts).

    An empirical ceiling: the true robust accuracy is at most this, and any certified accuracy at least
    no larger than the true one.
    """
    torch = _torch()
    x_t, y_t = _as_tensors(x, y)
    with deterministic(seed) as gen:
        with torch.no_grad():
            broken = model(x_t).argmax(dim=1) != y_t
        if eps > 0:
            for r in range(restarts):
                for loss in ("margin", "ce"):
                    _, fooled = pgd(
                        model, x_t, y_t, eps, norm, steps=steps, random_start=r > 0, loss=loss, generator=gen
                    )
                    broken |= fooled
    return float(1.0 - broken.double().mean())
