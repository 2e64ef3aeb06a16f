"""Bounds composed at max pooling: the graph factored at its max pools, each part bounded on its own.

Why
---
`lipsdp.graph.to_network` lowers a max pool exactly (a knockout tournament of max(a, b) = b + relu(a - b)).
That keeps every method sound, but a window of k entries becomes ceil(log2 k) comparator layers, each
wider than the pool, whose weight norms multiply: the plain product of the lowered layers' norms is then
hopeless (Convnet_maxpool, 4x4 pools: 402722, three orders above the truth), and the lowered chain is too
wide for the LipSDP methods. A max pool itself is a known, small constant.

What is proved
--------------
A max pool P computes out_i = max_{j in w_i} v_j over windows w_i. For every u, v and every window,
|max_{w_i} u - max_{w_i} v| <= max_{j in w_i} |u_j - v_j| (max is 1-Lipschitz in the max-norm), so

    ||P(u) - P(v)||^2 <= sum_i max_{j in w_i} (u_j - v_j)^2 <= sum_i sum_{j in w_i} (u_j - v_j)^2
                       = sum_j m_j (u_j - v_j)^2 <= m ||u - v||^2,

with m_j the number of windows holding entry j and m = max_j m_j (the pool's *multiplicity*: 1 for
non-overlapping windows; an entry repeated in one window is counted once). So Lip(P) <= sqrt(m), exactly
when some entry lies in m windows whose other entries do not move.

A max pool node M *factors* the graph when every path from the input to the output passes through it:
every node after M that the output needs reads only M, later nodes, or constants. Then
f = g_1 o P o g_0, with g_0 the part up to M's input and g_1 the part after M, and
Lip(f) <= Lip(g_1) sqrt(m) Lip(g_0). An activation phi >= 0-sloped whose only reader is M moves after it
(MaxPool(phi(z)) = phi(MaxPool(z)) for non-decreasing phi, as in the lowering), so g_0 ends at the
pre-activations and g_1 starts with phi. Each part is lowered exactly by `to_network`, and any method
bounds it. Several factoring pools give a product over all parts.

What `lipsdp verify` trusts here: the factoring and the parts' lowering are this module's and
`lipsdp.graph`'s code, re-run on the model file it loads (as the loaders themselves are trusted); each
part's bound and each constant sqrt(m) >= its pool's multiplicity are re-proved in ball arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

from lipsdp.graph import Graph, fused_activations, to_network
from lipsdp.network import Network


@dataclass(frozen=True)
class Composition:
    """The parts g_0, ..., g_k of a network factored at k max pools, and each pool's multiplicity m_i
    (between g_i and g_{i+1}); see the module docstring for why Lip(f) <= prod Lip(g_i) prod sqrt(m_i)."""

    parts: tuple[Network, ...]
    multiplicities: tuple[int, ...]
    # the tuples of the network this composition belongs to: it applies to that network only, never to one
    # derived from it (a class pair, a region, rescaled weights all build new tuples)
    owner: tuple = field(default=(), repr=False, compare=False)

    def applies_to(self, net: Network) -> bool:
        """True when `net` is the very network this composition factors (its arrays, not a transform)."""
        mine = (net.weights, net.biases, net.activations, net.alphas, net.betas)
        return len(self.owner) == len(mine) and all(a is b for a, b in zip(self.owner, mine))


def multiplicity(windows: np.ndarray) -> int:
    """The largest number of windows (rows; entries -1 absent) holding one entry: m in Lip(P) <= sqrt(m)."""
    win = np.asarray(windows, dtype=np.int64)
    counts: dict[int, int] = {}
    for row in win:
        for j in {int(x) for x in row if x >= 0}:
            counts[j] = counts.get(j, 0) + 1
    return max(counts.values())


def pool_lipschitz(m: int) -> float:
    """The smallest float c with c * c >= m exactly (sqrt(m) rounded upwards when it is not exact)."""
    c = math.sqrt(m)
    while Fraction(c) ** 2 < m:
        c = math.nextafter(c, math.inf)
    return c


def _ancestors(graph: Graph, node: int, start: int) -> set[int]:
    """The nodes after `start` that `node` needs (itself included), and the constants it reads."""
    need = {node}
    for i in range(node, start, -1):
        if i in need:
            need.update(graph.nodes[i].inputs)
    return {i for i in need if i > start or graph.nodes[i].op == "const"} - {start}


def _has_affine(graph: Graph, nodes: set[int]) -> bool:
    return any(graph.nodes[i].op == "affine" for i in nodes)


def factoring_pools(graph: Graph) -> list[tuple[int, int]]:
    """(pool, end of the part before it) for every max pool that factors the graph (module docstring), in
    graph order. The part before ends at the pool's input, or at that input's input when the input is an
    activation read by the pool only (it moves after the pool). A pool is used only when both parts hold
    an affine map (otherwise the exact lowering is as good)."""
    live = _ancestors(graph, graph.output, -1) | {0}
    fused = fused_activations(graph, live)
    cuts = []
    for m in sorted(live):
        node = graph.nodes[m]
        if node.op != "maxpool" or m == graph.output:
            continue
        after = {i for i in live if i > m}
        if any(s != m and s not in after and graph.nodes[s].op != "const" for i in after for s in graph.nodes[i].inputs):
            continue
        end = node.inputs[0]
        if end in fused:  # read by this pool only: it moves after the pool, as in the lowering
            end = graph.nodes[end].inputs[0]
        if end == 0 or not _has_affine(graph, _ancestors(graph, end, -1)) or not _has_affine(graph, after):
            continue
        cuts.append((m, end))
    return cuts


def _part(graph: Graph, start: int, stop: int, first: object | None) -> Graph:
    """The graph of the function from node `start`'s value (its new input) to node `stop`'s value; with
    `first` an activation applied to that input before anything else."""
    part = Graph(graph.size(start), where=graph.nodes[start].where or "input")
    index = {start: 0 if first is None else part.activation(0, first, "activation moved after the max pool")}
    for i in sorted(_ancestors(graph, stop, start)):
        node = graph.nodes[i]
        part.nodes.append(replace(node, inputs=tuple(index[s] for s in node.inputs)))
        index[i] = len(part.nodes) - 1
    part.output = index[stop]
    return part


def compose(graph: Graph, whole: Network) -> Composition | None:
    """The composition of `whole` (= `to_network(graph)`) at the graph's factoring max pools, or None."""
    cuts = factoring_pools(graph)
    if not cuts:
        return None
    parts, mults, start, first = [], [], 0, None
    for pool, end in cuts:
        parts.append(to_network(_part(graph, start, end, first)))
        mults.append(multiplicity(graph.nodes[pool].windows))
        fused = graph.nodes[pool].inputs[0] != end
        start, first = pool, (graph.nodes[graph.nodes[pool].inputs[0]].activation if fused else None)
    parts.append(to_network(_part(graph, start, graph.output, first)))
    owner = (whole.weights, whole.biases, whole.activations, whole.alphas, whole.betas)
    return Composition(tuple(parts), tuple(mults), owner)


def lower(graph: Graph) -> Network:
    """`to_network(graph)`, carrying the composition at its factoring max pools when it has some (the
    loaders' lowering; `lipsdp.estimate` and `lipsdp verify` use the composition, see the module docstring)."""
    whole = to_network(graph)
    comp = compose(graph, whole)
    return whole if comp is None else replace(whole, composition=comp)
