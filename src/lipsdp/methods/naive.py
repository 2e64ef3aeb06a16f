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
from lipsdp.proof import Proof


def _spectral_norm_certificate(w: np.ndarray):
    cert = certify(Network.from_arrays([w], []), None)
    if cert is None:
        raise VerificationError("could not verify a spectral norm; the weights may be too extreme to bound")
    return cert


def spectral_norm_bound(w: np.ndarray) -> float:
    """A verified upper bound on ||w||_2."""
    return _spectral_norm_certificate(w).upper


def naive(net: Network, **_: object) -> MethodOutput:
    """Product of spectral norms. Verified upper bound; usually far looser than LipSDP.

    Its proof ('product', `lipsdp.proof`) lists each layer's rho_k (rho_k I - W_k'W_k >= 0 proved) and the
    activations' Lipschitz constants max(|alpha|, |beta|)."""
    factors, raw, rhos, lips = [], 1.0, [], []
    for k, w in enumerate(net.weights):
        cert = _spectral_norm_certificate(w)
        factors.append(cert.upper)
        rhos.append(cert.rho)
        raw *= float(np.linalg.norm(w, 2))
        if k < net.depth:
            lip = float(max(np.max(np.abs(net.alphas[k])), np.max(np.abs(net.betas[k]))))
            factors.append(lip)
            lips.append(lip)
            raw *= lip
    proof = Proof("product", rhos=tuple(rhos), lipschitz=tuple(lips))
    return MethodOutput(
        certified_product(factors), raw, "ok", "product of verified norms", solver="numpy", proof=proof
    )
