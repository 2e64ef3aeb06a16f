"""MaxMin networks (Pauli et al., ICLR 2024): LipSDP-NSR against the product of norms, the Jacobian lower
bound and the same net written as a residual ReLU net under LipSDP-Neuron.

Reads ../shared/realnets/maxmin (MNIST MLPs `weights_l2_Kfc_N.mat`, and `resweights_5_32.mat`, read as
h = W_1 x; h <- h + MaxMin(W_k h) for the middle layers; y = W_l h, the layout of that repository's
LipschitzEstimationRes.m). Prints one table; run one benchmark at a time on a quiet machine:

    python benchmarks/maxmin.py [--skip-resrelu] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import scipy.io

import lipsdp
from lipsdp.graph import Graph, consecutive_groups, to_network

SHARED = Path(__file__).resolve().parents[2] / "shared" / "realnets" / "maxmin"


def read_weights(path: Path) -> list[np.ndarray]:
    return [np.asarray(w, dtype=np.float64) for w in scipy.io.loadmat(path)["W"].reshape(-1)]


def maxmin_graph(weights: list[np.ndarray], residual: bool, relu_form: bool) -> Graph:
    """The MLP (or the residual variant); MaxMin as comparators (NSR) or as max(a, b) = b + relu(a - b)."""
    g = Graph(weights[0].shape[1])
    node = 0
    for k, w in enumerate(weights):
        if residual and 0 < k < len(weights) - 1:
            branch = maxmin(g, g.affine(node, w), relu_form)
            node = g.add([node, branch])
            continue
        node = g.affine(node, w)
        if not residual and k < len(weights) - 1:
            node = maxmin(g, node, relu_form)
    return g


def maxmin(g: Graph, node: int, relu_form: bool) -> int:
    n = g.size(node)
    pairs = consecutive_groups(n, 2)
    if not relu_form:
        return g.groupsort(node, pairs, descending=True)
    low, high = g.select(node, pairs[:, 0]), g.select(node, pairs[:, 1])
    out = g.extrema(low, high, ["maximum"])["maximum"], g.extrema(low, high, ["minimum"])["minimum"]
    interleave = np.zeros((n, n))
    interleave[pairs[:, 0], np.arange(n // 2)] = 1.0
    interleave[pairs[:, 1], n // 2 + np.arange(n // 2)] = 1.0
    return g.affine(g.concat(list(out)), interleave)


def timed(net, method: str, **options):
    start = time.perf_counter()
    res = lipsdp.estimate(net, method, **options)
    return res, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-resrelu", action="store_true", help="skip the residual ReLU comparison")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not SHARED.exists():
        raise SystemExit(f"{SHARED} is not here")
    opts = {} if args.threads is None else {"threads": args.threads}
    rows = []
    for path in sorted(SHARED.glob("*.mat")):
        weights = read_weights(path)
        residual = path.name.startswith("res")
        net = to_network(maxmin_graph(weights, residual, relu_form=False))
        naive = lipsdp.estimate(net, "naive")
        nsr, t_nsr = timed(net, "neuron", lower=True, **opts)
        layer = lipsdp.estimate(net, "layer", **opts)
        product = float(np.prod([np.linalg.norm(w, 2) for w in weights])) if not residual else (
            np.linalg.norm(weights[0], 2) * np.prod([1 + np.linalg.norm(w, 2) for w in weights[1:-1]])
            * np.linalg.norm(weights[-1], 2))
        row = [path.stem, f"{product:.6g}", f"{naive.upper:.6g}", f"{layer.upper:.6g}", f"{nsr.upper:.6g}",
               "-" if nsr.gap is None else f"{nsr.gap:.1e}", f"{nsr.lower:.6g}", f"{t_nsr:.1f}"]
        if not args.skip_resrelu:
            relu_net = to_network(maxmin_graph(weights, residual, relu_form=True))
            rr, t_rr = timed(relu_net, "neuron", **opts)
            row += [f"{rr.upper:.6g}", rr.status, f"{t_rr:.1f}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["net", "norm product", "naive", "layer (NSR)", "neuron (NSR)", "gap", "lower", "s"]
    if not args.skip_resrelu:
        header += ["residual-ReLU neuron", "its status", "s"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
