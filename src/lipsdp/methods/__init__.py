"""The registry of bounding methods. Adding a method is one module and one line in `_REGISTRY`.

Every method takes a `Network` and keyword options and returns a `MethodOutput` whose `upper` is a
verified upper bound (proved by `lipsdp.certificate`); `raw` is the method's own, unverified value.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lipsdp.errors import UnknownMethodError
from lipsdp.proof import Proof, lmi_proof


@dataclass
class MethodOutput:
    """What a method hands back: a verified `upper`, the unverified `raw` value, and how it was proved."""

    upper: float
    raw: float
    status: str
    certificate: str
    multipliers: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    solver: str | None = None
    sdp_lower: float | None = None  # proven lower bound on the optimum of the LipSDP variant solved
    proof: Proof | None = None  # the data that proves `upper` for the network the method saw (`lipsdp.proof`)


def verified_output(
    net, multipliers: np.ndarray | None, raw: float, status: str, solver: str, notes: list[str] | None = None
) -> MethodOutput:
    """Certify a method's multipliers (repairing them if needed); if no LMI certificate can be made at all,
    fall back to the verified naive product and say so. Never returns an unverified number. A `raw` of
    NaN becomes the certificate's own estimate sqrt(rho*(T)). A network of
    one very wide hidden layer is proved with that layer eliminated (`lipsdp.eliminate`: the same LMI
    statement, on its Schur complement)."""
    from lipsdp import eliminate
    from lipsdp.certificate import certify_or_repair
    from lipsdp.errors import VerificationError
    from lipsdp.reduced import plan, usable

    notes = list(notes or [])
    try:
        if eliminate.applies(net) and multipliers is not None:
            cert = eliminate.certify(net, multipliers)
            if cert is None:
                raise VerificationError("the LMI with its wide hidden layer eliminated could not be proved")
            note = f"hidden layer of {net.sizes[1]} eliminated from the LMI (order {net.sizes[0] + net.sizes[2]})"
        else:
            cert, note = certify_or_repair(net, multipliers)
            gone = usable(net, plan(net), cert.multipliers)  # as `certificate.certify` chose
            if gone:
                kept = sum(n for k, n in enumerate(net.sizes[:-1]) if k not in gone)
                widths = ", ".join(str(net.sizes[j]) for j in gone)
                notes.append(f"hidden layers of {widths} neurons eliminated from the LMI (order {kept})")
    except VerificationError as exc:
        from lipsdp.methods.naive import naive

        out = naive(net)
        out.notes = notes + [f"no LMI certificate ({exc}); reporting the verified naive product instead"]
        out.raw, out.status = raw, status
        return out
    if note:
        notes.insert(0, note)
    if math.isnan(raw):  # the method has no value of its own: the certificate's estimate of rho*(T)
        raw = math.sqrt(max(cert.rho_estimate, 0.0))
    proof = lmi_proof(cert.rho, cert.multipliers, net.alphas, net.betas)
    return MethodOutput(cert.upper, raw, status, "lmi-cholesky", cert.multipliers, notes, solver, proof=proof)


# name -> (module, function, one-line description)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "naive": ("lipsdp.methods.naive", "naive", "product of the layers' spectral norms (verified, loose)"),
    "layer": ("lipsdp.methods.sdp", "lipsdp_layer", "LipSDP-Layer: one multiplier per layer (verified)"),
    "neuron": ("lipsdp.methods.sdp", "lipsdp_neuron", "LipSDP-Neuron: one multiplier per neuron (verified)"),
    "neuron-dense": (
        "lipsdp.methods.sdp",
        "lipsdp_neuron_dense",
        "LipSDP-Neuron through the direct dense CVXPY formulation (verified; for comparison)",
    ),
    "anytime": (
        "lipsdp.methods.anytime",
        "anytime",
        "first-order LipSDP-Neuron on CPU/GPU within a time budget (verified at any stopping time)",
    ),
    "sequential": (
        "lipsdp.methods.sequential",
        "sequential",
        "layer-by-layer closed-form multipliers, linear cost in depth (verified)",
    ),
}

_REFUSED = {
    "network": (
        "method 'network' (LipSDP-Network) is not offered: its coupled multipliers were shown unsound "
        "(Pauli et al., 2021, 'Training robust neural networks using Lipschitz bounds'), so its number is "
        "not a valid bound. Use method='neuron', which is sound and usually just as tight."
    ),
}


def available_methods() -> dict[str, str]:
    """Names of the registered methods with their descriptions."""
    return {name: desc for name, (_, _, desc) in _REGISTRY.items()}


def get_method(name: str) -> Callable[..., MethodOutput]:
    """Resolve a method name; unknown names raise an error listing the valid ones."""
    key = str(name).strip().lower()
    if key in _REFUSED or key.startswith("network"):
        raise UnknownMethodError(_REFUSED["network"])
    if key not in _REGISTRY:
        raise UnknownMethodError(f"unknown method '{name}'; valid methods: {', '.join(_REGISTRY)}")
    module, func, _ = _REGISTRY[key]
    fn = getattr(importlib.import_module(module), func)
    return fn if key in SPARSE_AWARE else _on_dense_weights(fn)


# Methods that take a network with CSR weights (`lipsdp.weights`) as it is: the others get dense copies.
SPARSE_AWARE = frozenset({"naive", "sequential", "anytime"})


def _on_dense_weights(fn: Callable[..., MethodOutput]) -> Callable[..., MethodOutput]:
    from lipsdp.network import dense_weights

    @functools.wraps(fn)
    def run(net, **options):
        return fn(dense_weights(net), **options)

    return run


def register_method(name: str, module: str, func: str, description: str) -> None:
    """Register an additional method (e.g. from a plug-in)."""
    _REGISTRY[name] = (module, func, description)
