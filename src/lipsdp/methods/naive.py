"""The naive bound: product of the layers' spectral norms times the activations' Lipschitz constants.

Verified: each ||W_k||_2 is proved by the same Cholesky certificate as LipSDP (a one-layer network),
and the product is rounded upwards.
"""

from __future__ import annotations

import math

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


# Layers up to this many entries get the dense certificate (exact up to rounding, about a second at this
# size); larger convolutions the kernel bound (within about 1% on CIFAR-size layers, milliseconds).
DENSE_NORM_ENTRIES = 2**20


def _layer_norm(net: Network, k: int) -> tuple[float, float, float]:
    """(verified bound, its rho = bound^2, estimate) for ||W_k||_2: for a large layer from the structured
    operator when the loader recorded one that is exactly W_k (a convolution: `lipsdp.conv`, no dense
    factorisation), else from the Cholesky certificate of the dense matrix."""
    op = net.operator(k) if net.weights[k].size > DENSE_NORM_ENTRIES else None
    if op is not None:
        rho = math.nextafter(op.norm_upper() ** 2, math.inf)
        return math.nextafter(math.sqrt(rho), math.inf), rho, op.norm_estimate()
    cert = _spectral_norm_certificate(net.weights[k])
    return cert.upper, cert.rho, math.sqrt(cert.rho_estimate)  # the certificate's own estimate: no SVD


def naive(net: Network, **_: object) -> MethodOutput:
    """Product of spectral norms. Verified upper bound; usually far looser than LipSDP.

    Its proof ('product', `lipsdp.proof`) lists each layer's rho_k (rho_k I - W_k'W_k >= 0 proved) and the
    activations' Lipschitz constants max(|alpha|, |beta|). Convolutions the loader recorded are bounded
    on their kernels (`lipsdp.conv.Conv2d.norm_upper`); `raw` is then their power-iteration estimate."""
    factors, raw, rhos, lips = [], 1.0, [], []
    for k in range(len(net.weights)):
        upper, rho, estimate = _layer_norm(net, k)
        factors.append(upper)
        rhos.append(rho)
        raw *= estimate
        if k < net.depth:
            lip = float(max(np.max(np.abs(net.alphas[k])), np.max(np.abs(net.betas[k]))))
            factors.append(lip)
            lips.append(lip)
            raw *= lip
    proof = Proof("product", rhos=tuple(rhos), lipschitz=tuple(lips))
    return MethodOutput(
        certified_product(factors), raw, "ok", "product of verified norms", solver="numpy", proof=proof
    )
