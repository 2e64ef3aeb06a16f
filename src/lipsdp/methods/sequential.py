"""Layer-by-layer bound: closed-form multipliers, linear cost in depth, no SDP solver."""

from __future__ import annotations

import numpy as np

from lipsdp.lmi import schur_rho, sequential_multipliers
from lipsdp.methods import MethodOutput, verified_output
from lipsdp.network import Network


def sequential(net: Network, **_: object) -> MethodOutput:
    """Verified upper bound from per-layer multipliers chosen greedily (`lmi.sequential_multipliers`).

    Looser than LipSDP-Neuron, never looser than the naive product; cost O(sum n_k^3).
    """
    try:
        t = sequential_multipliers(net)
    except (np.linalg.LinAlgError, ValueError):  # a singular quadratic form: verified_output falls back
        t = None
    raw = schur_rho(net, t) if t is not None else None
    return verified_output(net, t, float(np.sqrt(raw)) if raw is not None else float("nan"), "ok", "numpy")
