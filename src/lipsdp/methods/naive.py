"""The naive bound: product of the layers' spectral norms times the activations' Lipschitz constants.

Verified: each ||W_k||_2 is proved by the same Cholesky certificate as LipSDP (a one-layer network),
and the product is rounded upwards.
"""

from __future__ import annotations

import numpy as np

from lipsdp.certificate import certified_product, certify
from lipsdp.errors import VerificationError
from lipsdp.methods import MethodOutput
from lipsdp.network import Network


def spectral_norm_bound(w: np.ndarray) -> float:
    """A verified upper bound on ||w||_2."""
    cert = certify(Network.from_arrays([w], []), None)
    if cert is None:
        raise VerificationError("could not verify a spectral norm; the weights may be too extreme to bound")
    return cert.upper


def naive(net: Network, **_: object) -> MethodOutput:
    """Product of spectral norms. Verified upper bound; usually far looser than LipSDP."""
    factors, raw = [], 1.0
    for k, w in enumerate(net.weights):
        factors.append(spectral_norm_bound(w))
        raw *= float(np.linalg.norm(w, 2))
        if k < net.depth:
            lip = float(max(np.max(np.abs(net.alphas[k])), np.max(np.abs(net.betas[k]))))
            factors.append(lip)
            raw *= lip
    return MethodOutput(certified_product(factors), raw, "ok", "product of verified norms", solver="numpy")
