"""Layer-by-layer bound: closed-form multipliers and their best scale, linear cost in depth, no SDP solver."""

from __future__ import annotations

import numpy as np

from lipsdp import eliminate, reduced
from lipsdp.lmi import sequential_multipliers
from lipsdp.methods import MethodOutput, verified_output
from lipsdp.network import Network


def sequential(net: Network, **_: object) -> MethodOutput:
    """Verified upper bound from per-layer multipliers chosen greedily (`lmi.sequential_multipliers`) and
    then scaled along their ray to the best rho (`reduced.along_ray`).

    Looser than LipSDP-Neuron, never looser than the naive product; cost O(sum n_k^3). With slopes
    [-1, 1] (|.|, the norm-preserving layers) its layers decouple and the greedy multipliers reach the
    naive product only up to the margins that keep every block strictly definite: there the naive
    product is also certified and the smaller bound returned. Wide ReLU layers (a CNN's first
    convolutions) are eliminated from the LMI (`lipsdp.reduced`): the same multipliers and proof, with no
    block of those layers ever formed.
    """
    if eliminate.applies(net):  # one very wide hidden layer: the best single multiplier, on the reduced LMI
        t = eliminate.layer_multipliers(net)
        return _at_most_naive(net, verified_output(net, t, float("nan"), "ok", "numpy"))
    try:
        eliminated = reduced.plan(net)  # wide convolution layers: kept implicit (`lipsdp.reduced`)
        # (`lmi.sequential_multipliers` makes one CSR weight dense at a time)
        t = reduced.sequential_multipliers(net, eliminated) if eliminated else sequential_multipliers(net)
        t = reduced.along_ray(net, t, eliminated)
    except (np.linalg.LinAlgError, ValueError):  # a singular quadratic form: verified_output falls back
        t = None
    # raw: the certificate's own rho*(T) (its Schur recursion, once: on CNNs it costs a minute)
    return _at_most_naive(net, verified_output(net, t, float("nan"), "ok", "numpy"))


def _at_most_naive(net: Network, out: MethodOutput) -> MethodOutput:
    """With negative slopes (|.|-like layers) the naive product may be tighter: then it is returned."""
    if any(np.any(a < 0) for a in net.alphas):
        from lipsdp.methods.naive import naive

        product = naive(net)
        if product.upper < out.upper:
            product.notes = [*product.notes, "the product of norms was tighter than the layer-by-layer multipliers"]
            return product
    return out
