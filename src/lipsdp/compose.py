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

Weighted pools
--------------
The factor sqrt(m) and the plain product treat every pooled value alike. Weights do better: for
tau_i = 4^(e_i) on the pool's outputs and sigma_j = 4^(f_j) on its inputs with

    sigma_j >= sum over the windows i holding j of tau_i      (sigma_j = 0 for an entry no window reads),

the same steps give ||D (P(u) - P(v))||^2 <= sum_i tau_i max_(j in w_i) (u_j - v_j)^2
<= sum_j sigma_j (u_j - v_j)^2 = ||S (u - v)||^2, with D = diag(2^(e_i)), S = diag(2^(f_j)). So

    Lip(f) <= Lip(g_1 o D^-1) Lip(S o g_0),

and both are networks with exactly known float64 weights: S o g_0 scales the rows of g_0's last weight and
bias by 2^(f_j) (or 0), g_1 o D^-1 the columns of g_1's first weight by 2^(-e_i) (powers of two: exact,
checked). When g_1 starts with the activation moved after the pool (its first weight the identity, no
bias, a positively homogeneous activation: relu(c x) = c relu(x) for c > 0), D^-1 is moved through that
activation onto the next weight's columns instead: the same function, and a first layer every method
treats well. With several pools a middle part gets both. `choose_weights` picks the exponents by
minimising, over log tau, the product of the parts' linearisations' norms (all slopes at their mid-point:
a proxy, so any choice is sound), rounded to powers of four; they are used only when that proxy beats the
unweighted product times sqrt(m) by WEIGHTED_GAIN, and `lipsdp.estimate` keeps them only when the naive
product of the weighted parts is not above the plain composition's (so weighting never loosens naive).

What `lipsdp verify` trusts here: the factoring, the parts' lowering and the weighted parts' exact
scaling are this module's and `lipsdp.graph`'s code, re-run on the model file it loads (as the loaders
themselves are trusted); each part's bound, each constant sqrt(m) >= its pool's multiplicity and each
weight inequality sigma_j >= sum tau_i (exactly, in integers) are re-checked.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

from lipsdp.graph import Graph, fused_activations, to_network
from lipsdp.network import Network
from lipsdp.weights import dense, is_identity, is_sparse

WEIGHTED_GAIN = 1.01  # weighted pools are used when their proxy is at least this factor below the plain one
HOMOGENEOUS = frozenset({"relu", "leaky_relu", "identity"})  # phi(c x) = c phi(x) for every c > 0


@dataclass(frozen=True)
class Composition:
    """The parts g_0, ..., g_k of a network factored at k max pools, and each pool's multiplicity m_i
    (between g_i and g_{i+1}); see the module docstring for why Lip(f) <= prod Lip(g_i) prod sqrt(m_i)."""

    parts: tuple[Network, ...]
    multiplicities: tuple[int, ...]
    # each pool's windows (rows: outputs; entries: indices into the output of the part before, -1 absent)
    windows: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
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
    parts, mults, windows, start, first = [], [], [], 0, None
    for pool, end in cuts:
        parts.append(to_network(_part(graph, start, end, first)))
        mults.append(multiplicity(graph.nodes[pool].windows))
        windows.append(np.asarray(graph.nodes[pool].windows, dtype=np.int64))
        fused = graph.nodes[pool].inputs[0] != end
        start, first = pool, (graph.nodes[graph.nodes[pool].inputs[0]].activation if fused else None)
    parts.append(to_network(_part(graph, start, graph.output, first)))
    owner = (whole.weights, whole.biases, whole.activations, whole.alphas, whole.betas)
    return Composition(tuple(parts), tuple(mults), tuple(windows), owner)


def lower(graph: Graph) -> Network:
    """`to_network(graph)`, carrying the composition at its factoring max pools when it has some (the
    loaders' lowering; `lipsdp.estimate` and `lipsdp verify` use the composition, see the module docstring)."""
    whole = to_network(graph)
    comp = compose(graph, whole)
    return whole if comp is None else replace(whole, composition=comp)


# -- weighted pools -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolWeights:
    """The weights of one pool (module docstring): tau_i = 4^out_exponents[i] on its outputs and
    sigma_j = 4^in_exponents[j] on its inputs, None for sigma_j = 0 (an entry no window reads)."""

    out_exponents: tuple[int, ...]
    in_exponents: tuple[int | None, ...]


def _incidence(windows: np.ndarray, n_in: int):
    """The 0/1 matrix M (outputs x inputs) with M[i, j] = 1 when window i holds entry j (once)."""
    import scipy.sparse as sp

    win = np.asarray(windows, dtype=np.int64)
    rows = np.repeat(np.arange(win.shape[0]), win.shape[1])
    cols = win.reshape(-1)
    keep = cols >= 0
    m = sp.coo_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])), shape=(win.shape[0], n_in)).tocsr()
    m.data[:] = 1.0  # duplicates summed by tocsr: an entry repeated in one window counts once
    return m


def weights_hold(windows: np.ndarray, n_in: int, weights: PoolWeights) -> str | None:
    """None when sigma_j >= sum of tau_i over the windows holding j for every entry j (exactly, in
    integers), and sigma_j = 0 only for entries no window reads; else the reason."""
    win = np.asarray(windows, dtype=np.int64)
    e, f = weights.out_exponents, weights.in_exponents
    if len(e) != win.shape[0] or len(f) != n_in:
        return f"{len(e)} output and {len(f)} input weights for a pool of {win.shape[0]} outputs and {n_in} inputs"
    if any(not isinstance(x, int) or abs(x) > 500 for x in e) or any(
        x is not None and (not isinstance(x, int) or abs(x) > 500) for x in f
    ):
        return "the exponents must be integers of magnitude at most 500"
    for j, holders in enumerate(_holders(_incidence(win, n_in))):
        if holders.size == 0:
            continue
        if f[j] is None:
            return f"input {j} is read by a window but its weight is zero"
        low = min(min(e[i] for i in holders), f[j])
        if 4 ** (f[j] - low) < sum(4 ** (e[i] - low) for i in holders):
            return f"input {j}: 4^{f[j]} is below the sum of its windows' weights"
    return None


def _holders(incidence) -> list[np.ndarray]:
    """Per input entry j: the windows holding it (each once), from the incidence matrix's columns."""
    csc = incidence.tocsc()
    return [csc.indices[csc.indptr[j]:csc.indptr[j + 1]] for j in range(csc.shape[1])]


def _scaled_rows(net: Network, exponents: tuple[int | None, ...]) -> Network:
    """S o net: the last weight's and bias's rows times 2^f (0 for None); exact, else ValueError."""
    w, b = dense(net.weights[-1]), net.biases[-1]  # (one part's last weight; stored again by _with)
    zero = np.array([x is None for x in exponents])
    f = np.array([0 if x is None else x for x in exponents], dtype=np.int64)
    w2, b2 = np.ldexp(w, f[:, None]), np.ldexp(b, f)
    w2[zero], b2[zero] = 0.0, 0.0
    live = ~zero
    if not (np.array_equal(np.ldexp(w2[live], -f[live, None]), w[live]) and np.array_equal(np.ldexp(b2[live], -f[live]), b[live])):
        raise ValueError("a row scaling by a power of two is not exact (under- or overflow)")
    return _with(net, len(net.weights) - 1, w2, b2)


def _homogeneous(net: Network) -> bool:
    act = net.activations[0]
    base = getattr(act, "base", None)
    return (base.name if base is not None else act.name) in HOMOGENEOUS


def _scaled_columns(net: Network, exponents: tuple[int, ...]) -> Network:
    """net o D^-1: the first weight's columns times 2^-e, or the second's when the first layer is the
    identity without bias before a positively homogeneous activation (module docstring); exact, else
    ValueError."""
    e = -np.array(exponents, dtype=np.int64)
    w0 = net.weights[0]
    through = (
        net.depth >= 1 and w0.shape[0] == w0.shape[1] and not np.any(net.biases[0])
        and is_identity(w0) and _homogeneous(net)
    )
    k = 1 if through else 0
    w = dense(net.weights[k])  # (one weight; stored again by _with)
    w2 = np.ldexp(w, e[None, :])
    if not np.array_equal(np.ldexp(w2, -e[None, :]), w):
        raise ValueError("a column scaling by a power of two is not exact (under- or overflow)")
    return _with(net, k, w2, net.biases[k])


def _with(net: Network, k: int, w: np.ndarray, b: np.ndarray) -> Network:
    weights, biases = list(net.weights), list(net.biases)
    weights[k], biases[k] = w, b
    ops = list(net.operators) + [None] * (len(weights) - len(net.operators)) if net.operators else None
    if ops is not None:
        ops[k] = None  # the recorded operator is not this weight's any more
    return Network.from_arrays(weights, list(net.activations), biases, ops)


def weighted_parts(comp: Composition, weights: tuple[PoolWeights, ...]) -> list[Network]:
    """The parts S_(i+1) o g_i o D_i^-1 (module docstring); ValueError when a scaling is not exact."""
    if len(weights) != len(comp.multiplicities):
        raise ValueError(f"{len(weights)} pool weights for {len(comp.multiplicities)} pools")
    parts = list(comp.parts)
    for p, w in enumerate(weights):
        parts[p] = _scaled_rows(parts[p], w.in_exponents)
        parts[p + 1] = _scaled_columns(parts[p + 1], w.out_exponents)
    return parts


class _Linearised:
    """The part's map with every slope at its mid-point, as products (a mostly-zero weight, e.g. a
    convolution's matrix, as a sparse matrix: its products then cost its nonzeros)."""

    def __init__(self, net: Network):
        import scipy.sparse as sp

        self.weights = [
            sp.csr_matrix(w) if is_sparse(w) or (w.size > 10_000 and np.count_nonzero(w) < 0.1 * w.size) else w
            for w in net.weights
        ]
        self.mid = [0.5 * (a + b) for a, b in zip(net.alphas, net.betas)]
        self.shape = (net.weights[-1].shape[0], net.weights[0].shape[1])

    def matvec(self, x: np.ndarray) -> np.ndarray:
        for w, h in zip(self.weights[:-1], self.mid):
            x = h * (w @ x)
        return self.weights[-1] @ x

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        for w, h in zip(self.weights[:0:-1], self.mid[::-1]):
            y = h * (w.T @ y)
        return self.weights[0].T @ y


def _top_singular(op: _Linearised, left: np.ndarray, right: np.ndarray, start: np.ndarray | None):
    """The top singular triplet (u, s, v) of A = diag(left) op diag(right): Lanczos on A'A or AA' (the
    smaller side; `start` a vector of that side, else a fixed one), dense below 64 on that side."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    def a(x):
        return left * op.matvec(right * x)

    def at(y):
        return right * op.rmatvec(left * y)

    m, n = op.shape
    small = min(m, n)
    if small <= 64:
        dense = np.column_stack([a(e) for e in np.eye(n)]) if n <= m else np.vstack([at(e) for e in np.eye(m)])
        u, sv, vt = np.linalg.svd(dense, full_matrices=False)
        return u[:, 0], float(sv[0]), vt[0]
    gram = (lambda x: at(a(x.reshape(-1)))) if n <= m else (lambda y: a(at(y.reshape(-1))))
    if start is None or start.shape != (small,) or not np.any(start):
        start = np.ones(small) + 1e-3 * np.cos(np.arange(small))
    lin = LinearOperator((small, small), matvec=gram, dtype=np.float64)
    try:
        vals, vecs = eigsh(lin, k=1, which="LA", v0=start, tol=1e-8, maxiter=50 * small)
    except ArpackNoConvergence as exc:
        if not len(exc.eigenvalues):
            raise
        vals, vecs = exc.eigenvalues, exc.eigenvectors
    sv = math.sqrt(max(float(vals[0]), 0.0))
    x = vecs[:, 0]
    if n <= m:
        u = a(x) / sv if sv > 0 else np.zeros(m)
        return u, sv, x
    v = at(x) / sv if sv > 0 else np.zeros(n)
    return x, sv, v


def choose_weights(
    comp: Composition, evaluations: int = 500, seconds: float = 120.0
) -> tuple[tuple[PoolWeights, ...], float] | None:
    """Pool weights minimising the proxy sum_i log ||S_(i+1) J_i D_i^-1|| (J_i: part i linearised at its
    mid slopes), by L-BFGS on log tau for at most `evaluations` proxy evaluations, rounded to powers of
    four; returns them and the proxy's gain over the unweighted composition (prod ||J_i|| times prod
    sqrt(m)), or None when that gain is below WEIGHTED_GAIN or the windows are not recorded.
    Deterministic (fixed Lanczos starts, a count of evaluations), unless the safety cap `seconds` ends it."""
    from scipy.optimize import minimize

    if len(comp.windows) != len(comp.multiplicities):
        return None
    ops = [_Linearised(p) for p in comp.parts]
    incid = [_incidence(w, comp.parts[i].weights[-1].shape[0]) for i, w in enumerate(comp.windows)]
    sizes = [m.shape[0] for m in incid]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    deadline = time.perf_counter() + seconds
    v0s: list[np.ndarray | None] = [None] * len(ops)

    def scalings(s: np.ndarray):
        taus = [np.exp(s[starts[p]:starts[p + 1]]) for p in range(len(incid))]
        sig = [np.sqrt(m.T @ t) for m, t in zip(incid, taus)]
        lefts = [*sig, np.ones(ops[-1].shape[0])]
        rights = [np.ones(ops[0].shape[1]), *(1.0 / np.sqrt(t) for t in taus)]
        return taus, sig, lefts, rights

    def proxy(s: np.ndarray) -> tuple[float, np.ndarray]:
        taus, sig, lefts, rights = scalings(s)
        value, grad = 0.0, np.zeros_like(s)
        for i, op in enumerate(ops):
            u, sv, v = _top_singular(op, lefts[i], rights[i], v0s[i])
            v0s[i] = v if op.shape[1] <= op.shape[0] else u
            value += math.log(max(sv, 1e-300))
            if i > 0:  # D_(i-1)^-1 on this part's input: d log s / d s = -1/2 v^2
                grad[starts[i - 1]:starts[i]] += -0.5 * v * v
            if i < len(incid):  # S_i on its output: 1/2 tau (M (u^2 / sigma))
                ratio = np.divide(u * u, sig[i] ** 2, out=np.zeros_like(u), where=sig[i] > 0)
                grad[starts[i]:starts[i + 1]] += 0.5 * taus[i] * (incid[i] @ ratio)
        return value, grad

    class _Stop(Exception):
        pass

    best = {"s": np.zeros(starts[-1]), "value": math.inf}
    count = [0]

    def fun(s: np.ndarray):
        if time.perf_counter() > deadline or count[0] >= evaluations:
            raise _Stop
        count[0] += 1
        value, grad = proxy(s)
        if value < best["value"]:
            best.update(s=s.copy(), value=value)
        return value, grad

    plain = sum(math.log(_top_singular(op, np.ones(op.shape[0]), np.ones(op.shape[1]), None)[1]) for op in ops)
    plain += sum(0.5 * math.log(m) for m in comp.multiplicities)
    try:
        minimize(fun, best["s"], jac=True, method="L-BFGS-B", options={"maxiter": 5000})
    except _Stop:
        pass
    weights = []
    for p, m in enumerate(incid):
        s = best["s"][starts[p]:starts[p + 1]] / math.log(4.0)
        e = np.rint(s - np.median(s)).astype(np.int64)
        weights.append(PoolWeights(tuple(int(x) for x in e), _input_exponents(m, e)))
    lefts = [np.array([0.0 if f is None else math.ldexp(1.0, f) for f in w.in_exponents]) for w in weights]
    rights = [np.ldexp(1.0, -np.array(w.out_exponents, dtype=np.int64)) for w in weights]
    lefts.append(np.ones(ops[-1].shape[0]))
    rights.insert(0, np.ones(ops[0].shape[1]))
    rounded = sum(math.log(max(_top_singular(op, lefts[i], rights[i], v0s[i])[1], 1e-300)) for i, op in enumerate(ops))
    gain = math.exp(plain - rounded)
    return (tuple(weights), gain) if gain >= WEIGHTED_GAIN else None


def _input_exponents(incidence, e: np.ndarray) -> tuple[int | None, ...]:
    """The smallest f_j with 4^f_j >= sum of 4^e_i over the windows i holding j (exact, in integers)."""
    out: list[int | None] = []
    for holders in _holders(incidence):
        if holders.size == 0:
            out.append(None)
            continue
        ex = e[holders]
        low = int(ex.min())
        total = sum(4 ** int(x - low) for x in ex)
        out.append(low + ((total - 1).bit_length() + 1) // 2)
    return tuple(out)
