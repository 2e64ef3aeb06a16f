"""Layer-by-layer bound: closed-form multipliers, linear cost in depth, no SDP solver."""

from __future__ import annotations

from lipsdp.certify import certify_or_repair
from lipsdp.lmi import sequential_multipliers
from lipsdp.methods import MethodOutput
from lipsdp.network import Network


def sequential(net: Network, **_: object) -> MethodOutput:
    """Verified upper bound from per-layer multipliers chosen greedily (`lmi.sequential_multipliers`).

    Looser than LipSDP-Neuron, never looser than the naive product; cost O(sum n_k^3).
    """
    t = sequential_multipliers(net)
    cert, note = certify_or_repair(net, t)
    return MethodOutput(
        cert.upper, cert.rho_estimate**0.5, "ok", "lmi-cholesky", cert.multipliers, [note] if note else [], "numpy"
    )
