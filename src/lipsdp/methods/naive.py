"""The naive bound: product of the layers' spectral norms times the activations' Lipschitz constants.

Verified: each ||W_k||_2 is proved by the same Cholesky certificate as LipSDP (a one-layer network), by
the Hoelder bound with its rounding covered, or, for a large convolution, on its kernel (`lipsdp.conv`);
the product is rounded upwards.
"""

from __future__ import annotations

import math

import numpy as np

from lipsdp.certificate import UNIT_ROUNDOFF, certified_product, certify, gamma
from lipsdp.errors import VerificationError
from lipsdp.lmi import norm_estimate
from lipsdp.methods import MethodOutput
from lipsdp.network import Network
from lipsdp.proof import Proof
from lipsdp.weights import entries


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
# The dense certificate factors the Gram matrix of the smaller side (||W|| = ||W'||) several times; above
# this order that takes minutes, and such a layer (e.g. the comparators of a lowered max pooling) gets only
# the Hoelder bound.
DENSE_NORM_SIDE = 4096


def holder_bound(w: np.ndarray) -> float:
    """sqrt(||W||_1 ||W||_inf) >= ||W||_2 (Hoelder), in O(entries). Sums of non-negative terms are computed
    within a factor 1 + g_n (Higham), so dividing by 1 - g_n and rounding the rest upwards keeps it a bound.
    Tight for matrices whose rows and columns have few, equal entries (comparators, pooling, selections)."""
    a = np.abs(w)
    g = gamma(max(w.shape))
    cols = float(np.max(a.sum(axis=0))) / (1.0 - g)
    rows = float(np.max(a.sum(axis=1))) / (1.0 - g)
    return math.nextafter(math.sqrt(cols * rows) * (1.0 + 4.0 * UNIT_ROUNDOFF), math.inf)


def _layer_norm(net: Network, k: int) -> tuple[float, float, float]:
    """(verified bound, its rho = bound^2, estimate) for ||W_k||_2: for a large layer from the structured
    operator when the loader recorded one that is exactly W_k (a convolution: `lipsdp.conv`, no dense
    factorisation), else the smaller of the Hoelder bound and the Cholesky certificate of the Gram matrix
    of the smaller side (the latter only up to order `DENSE_NORM_SIDE`)."""
    w = net.weights[k]
    op = net.operator(k) if entries(w) > DENSE_NORM_ENTRIES else None
    if op is not None:
        return (*_from_norm(op.norm_upper()), op.norm_estimate())
    holder = holder_bound(w)
    if min(w.shape) > DENSE_NORM_SIDE:
        return (*_from_norm(holder), norm_estimate(w))
    cert = _spectral_norm_certificate(w if w.shape[1] <= w.shape[0] else w.T)
    estimate = math.sqrt(cert.rho_estimate)  # the certificate's own: no SVD
    return (*_from_norm(holder), estimate) if holder < cert.upper else (cert.upper, cert.rho, estimate)


def _from_norm(bound: float) -> tuple[float, float]:
    """(upper, rho) with rho >= bound^2 and upper >= sqrt(rho), both rounded upwards."""
    rho = math.nextafter(bound * bound, math.inf)
    return math.nextafter(math.sqrt(rho), math.inf), rho


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
