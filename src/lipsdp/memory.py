"""Refuse a dense LMI method up front when its blocks cannot fit in memory (an error, never a killed process).

The LMI methods (`sequential`, `anytime`, `layer`, `neuron`) hold dense blocks of the chain: the n_k x n_k
diagonal blocks, the n_k x n_(k+1) off-diagonal ones, their Cholesky factors and the solver's
temporaries. Their peak is at most about `PEAK_FACTOR` 8-byte numbers per entry of those blocks; measured
(process peak / block entries x 8 bytes, sequential, 2 cores) on the CIFAR-10 CNNs of VNN-COMP:
resnet_4b 7164 MiB / 2245 MiB (x3.2), resnet_2b 2658 / 744 (x3.6), cifar_base_kw 1679 / 466 (x3.6),
cifar10_large 5867 / 2120 (x2.8), and a net shaped like COLT's cifar10_8_255 (3072 -> 8192 -> 8192 ->
250 -> 10, two coupled blocks of 8192) 7771 / 1812 (x4.3), but 14648 (x8.1) when the certificate tried
several multiplier recipes, each with its formed LMI kept for the next rho (since then a large LMI's
recipe is dropped once done, and that net eliminates a layer: 3834 MiB). A chain whose estimate exceeds the memory
available would be killed by the kernel mid-solve (a ConvBig-sized layer of 32768 neurons needs ~100
GB); it gets a `LipSDPError` naming the widest layer and what to use instead. The memory available is
what the system reports (Linux MemAvailable), or `LIPSDP_MEMORY_GIB` when set (to allow more, with swap,
or less). `neuron` and `layer` run the structured interior point, whose dense n x n, n x K and K x K
matrices (`ipm_entries`) outgrow the blocks on CNNs: 4.2 GiB of them on cifar_base_kw, 17 GiB on
resnet_2b; it is estimated by the larger of the two. A network whose one wide hidden layer is eliminated
(`lipsdp.eliminate`), or whose wide ReLU layers are (`lipsdp.reduced`), never forms those layers' blocks
and is estimated without them.
"""

from __future__ import annotations

import os
from itertools import pairwise

from lipsdp.errors import LipSDPError
from lipsdp.network import Network

PEAK_FACTOR = 8.5  # peak bytes / (8 bytes x entries of the dense blocks), above every measured ratio
DENSE_METHODS = frozenset({"sequential", "anytime", "layer", "neuron", "neuron-dense"})
REDUCING_METHODS = frozenset({"sequential", "anytime"})  # those that never form an eliminated layer's blocks
IPM_METHODS = frozenset({"neuron", "layer"})  # the structured interior point (`ipm_entries`)
IPM_SQUARES = 8  # n x n matrices alive at its peak
# process peak / (8 bytes x `ipm_entries`), neuron, 2 cores: a random 1024-1024-768-64-10 net 1894 / 1332 MiB
# (x1.42), cifar_base_kw 6037 / 4280 MiB (x1.41; 954 s to the optimum)
IPM_PEAK_FACTOR = 1.6


def block_entries(net: Network, reduces: bool = True) -> int:
    """Entries of the LMI's dense blocks: sum n_k^2 + sum n_k n_(k+1) over the blocks x_0 .. x_l, skipping the
    layers `lipsdp.reduced` eliminates when `reduces` (with one eliminated wide last layer: the reduced
    matrix of order n_0 + n_2 and the weights' n_1 (n_0 + n_2))."""
    from lipsdp import eliminate, reduced

    if eliminate.applies(net):
        n0, n1, n2 = net.sizes
        return (n0 + n2) ** 2 + n1 * (n0 + n2)
    gone = reduced.plan(net) if reduces else ()  # wide layers eliminated: only the kept layers' blocks (`lipsdp.reduced`)
    sizes = [n for k, n in enumerate(net.sizes[:-1]) if k not in gone]
    return sum(n * n for n in sizes) + sum(a * b for a, b in pairwise(sizes))


def ipm_entries(net: Network) -> int:
    """Entries of the structured interior point's dense working set (`methods.ipm`, for `neuron` and
    `layer`): the n x n matrices (X, its factor, Z^-1, the directions; n the LMI's order, the input block
    cut to the first hidden layer's width when wider, as the solver does), the n x K products X U and
    Z^-1 U and the K x K ones of its Newton system (K = n_0 + 2 x hidden neurons)."""
    n0 = min(net.sizes[0], net.sizes[1]) if net.depth else net.sizes[0]
    n = n0 + sum(net.sizes[1:-1])
    k = n0 + 2 * net.n_neurons
    return IPM_SQUARES * n * n + 3 * n * k + 3 * k * k


def available_bytes() -> int | None:
    """The memory a method may use: LIPSDP_MEMORY_GIB when set, else what Linux reports available now
    (MemAvailable); None when neither is known."""
    cap = os.environ.get("LIPSDP_MEMORY_GIB")
    if cap:
        try:
            return int(float(cap) * 2**30)
        except ValueError:
            raise LipSDPError(f"LIPSDP_MEMORY_GIB must be a number of GiB, got {cap!r}") from None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(net: Network, method: str) -> None:
    """Raise `LipSDPError` when a dense LMI method's estimated peak exceeds the available memory."""
    if str(method).strip().lower() not in DENSE_METHODS or net.depth == 0:
        return
    available = available_bytes()
    if available is None:
        return
    from lipsdp import eliminate

    name = str(method).strip().lower()
    # `sequential` and `anytime` run on the reduced LMI; the other methods optimise the full one
    need = PEAK_FACTOR * 8.0 * block_entries(net, reduces=name in REDUCING_METHODS)
    what = "the dense LMI blocks"
    if name in IPM_METHODS and not eliminate.applies(net):  # (one wide layer eliminated: refused elsewhere)
        ipm = IPM_PEAK_FACTOR * 8.0 * ipm_entries(net)
        if ipm > need:
            need, what = ipm, "the interior point's dense matrices"
    if need <= available:
        return
    widest = max(range(len(net.sizes) - 1), key=lambda k: net.sizes[k])
    also = " or method='sequential' / 'anytime' (first order, the same LMI)" if name in IPM_METHODS else ""
    raise LipSDPError(
        f"method '{method}' would need about {need / 2**30:.3g} GiB for {what} of this network "
        f"(widest layer: {net.sizes[widest]} neurons, layer {widest}), more than the {available / 2**30:.3g} GiB "
        f"available; use method='naive' (operator norms, no dense blocks){also}, split=K to bound pieces "
        "of K layers, or a machine with more memory (LIPSDP_MEMORY_GIB overrides the amount assumed available)"
    )
