"""Networks as graphs: a small DAG of operations on flat vectors, and its exact lowering to a chain.

The IR
------
A `Graph` is a list of nodes in topological order, each computing one flat float64 vector:

- ``input``     the network's input (n_0 values; tensors are flattened in C order by the front ends);
- ``const``     a constant vector;
- ``affine``    W v + b for one input v: a dense matrix, or a 1-D vector for a diagonal map. Convolutions,
                average pooling, padding, reshapes and transposes all become such matrices in the front ends
                (`lipsdp.unroll`, `lipsdp.io.layout`). A CSR weight is made dense here: the lowering works on
                dense expressions (the chain it returns stores its large layers as CSR again, `lipsdp.weights`);
- ``act``       an elementwise slope-restricted activation (`lipsdp.activations`);
- ``add``       the sum of several inputs of one size (residual connections);
- ``concat``    the concatenation of several inputs;
- ``maxpool``   out_i = max_j v[windows[i, j]] over the window entries >= 0 (windows may overlap, and may
                have fewer entries than others: -1 marks an absent entry, e.g. -inf padding);
- ``groupsort`` the values of each group (a row of `windows`: disjoint positions, all of one size g) sorted
                in place, ascending or descending along the row; other entries unchanged. MaxMin is g = 2,
                descending: (a, b) -> (max(a, b), min(a, b));
- ``householder`` per group z (a row of `windows`) with vector v (a row of `vectors`): z if v'z >= 0, else
                the reflection z - 2 (v'z / v'v) v (Singla et al.'s Householder activation); others unchanged.

`Graph.forward` evaluates the DAG directly (the reference the tests compare the lowering with).

The lowering (`to_network`)
---------------------------
`to_network(graph)` returns a chain `Network` computing exactly the graph's function, so every method
(naive, sequential, layer, neuron, anytime, the certificate and `lipsdp verify`, pair, region, certify,
split) bounds the graph with no change. Every value is kept as an affine expression A h_L[cols] + c of the
neurons of one layer L of the chain (layer 0 is the input):

- an affine map of an expression is multiplied out (W A, W c + b): an affine map of affine maps is one
  affine map. The product of two float matrices is rounded, so the lowered net is the *float64 product*
  of the graph's maps, as `lipsdp.scaling.fold_linear_layers` already does; its bound is proved for those
  float64 weights exactly. (When the product would be larger than its two factors, the expression is first
  stored in pass-through neurons, as `lipsdp.io.chain` joins such maps by an identity layer);
- an activation creates neurons in the next layer whose pre-activations are the expression's rows;
- a value needed in a later layer (a skip connection) is carried there by *pass-through neurons*: the
  identity activation, slope bounds [1, 1], x = identity(x) exactly, placed beside the real neurons of each
  layer in between (`lipsdp.activations.Mixed`). It carries the expression's rows, or the neurons its
  rows read when they are fewer (a 1x1 stride-2 shortcut reads a quarter of the layer); a neuron carried
  into a layer once is reused by every later expression that reads it;
- an Add of expressions of one layer is the sum of their matrices: it becomes part of the next affine map;
  a Concat stacks their rows;
- max(a, b) = b + relu(a - b) exactly: one relu neuron for a - b and one pass-through neuron for b, and
  the sum folds into the next affine map. A window of k entries takes ceil(log2 k) such levels (a knockout
  tournament; max is associative). Overlapping windows each get their own neurons;
- the norm-preserving operations become `Reflect` layers (|.| on some neurons, the identity on the others,
  all declared slope-restricted in [-1, 1]; see `lipsdp.activations.Reflect` for why [-1, 1]): a
  comparator (a, b) -> (max, min) is ((s + |d|) / 2, (s - |d|) / 2) with s = a + b, d = a - b, so one
  identity and one |.| neuron (coefficients 1, -1, 1/2: exact in binary). GroupSort of g > 2 is a
  sorting network of such comparators, one layer per round: Batcher's bitonic sorter for g a power of two
  (every round pairs every entry), else odd-even transposition (g rounds; Knuth, TAOCP 5.3.4). A Householder group is z - (v'z - |v'z|) v / v'v: g identity neurons and one |.|
  neuron. Entries outside the groups are identity neurons of the same layer ([-1, 1]); values carried past
  the layer (skip connections) are pass-through neurons ([1, 1]) as everywhere else;
- MaxPool(phi(z)) = phi(MaxPool(z)) for every non-decreasing phi, and every lipsdp activation is
  non-decreasing (alpha >= 0), so an activation whose only reader is a max pool is moved after it: the
  tournament then runs on the pre-activations and phi is applied to the pooled values only (far fewer
  neurons; the same function);
- a layer holds one activation besides its pass-through neurons; an activation that differs from the one
  already in its layer goes to the next free layer (its input carried there).

Why every bound is sound: the lowered chain computes the graph's function (the identities above are exact
in real arithmetic; the weights are the float64 products), and each of its hidden neurons is either an
activation of the graph with that activation's slope bounds, a relu with [0, 1], the identity with
[1, 1] or [-1, 1], or |.| with [-1, 1], which it is. A bound on the chain's Lipschitz constant is therefore a bound on the graph's. Nothing
else is assumed: the methods see an ordinary `Network`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lipsdp.activations import Activation, GroupSort, Mixed, activation, mixed, reflect
from lipsdp.errors import InvalidNetworkError
from lipsdp.network import Network, apply_activation
from lipsdp.weights import dense, is_sparse

OPS = ("input", "const", "affine", "act", "add", "concat", "maxpool", "groupsort", "householder")


@dataclass(frozen=True, eq=False)
class Node:
    """One operation of a `Graph` (see the module docstring); `where` names it in messages."""

    op: str
    inputs: tuple[int, ...]
    size: int
    where: str = ""
    weight: np.ndarray | None = field(default=None, repr=False)  # affine: (size, n_in), or 1-D diagonal
    bias: np.ndarray | None = field(default=None, repr=False)  # affine, const
    activation: Activation | None = None  # act
    windows: np.ndarray | None = field(default=None, repr=False)  # maxpool: (size, k) input indices, -1 absent;
    # groupsort, householder: (groups, g) disjoint input positions
    descending: bool = False  # groupsort
    vectors: np.ndarray | None = field(default=None, repr=False)  # householder: (groups, g)
    operator: object | None = field(default=None, repr=False)  # affine: its structured form (lipsdp.conv)


class Graph:
    """A DAG of operations on flat vectors; node 0 is the input. Build it with the methods below (each
    returns the new node's id) and set `output`."""

    def __init__(self, n_in: int, where: str = "input") -> None:
        if int(n_in) < 1:
            raise InvalidNetworkError(f"the graph input needs at least one value, got {n_in}")
        self.nodes: list[Node] = [Node("input", (), int(n_in), where)]
        self.output = 0

    def __len__(self) -> int:
        return len(self.nodes)

    def size(self, node: int) -> int:
        return self.nodes[node].size

    def _check(self, srcs: Sequence[int], where: str) -> tuple[int, ...]:
        out = tuple(int(s) for s in srcs)
        if not out or any(not 0 <= s < len(self.nodes) for s in out):
            raise InvalidNetworkError(f"{where}: inputs {list(srcs)} are not earlier nodes of the graph")
        return out

    def _push(self, node: Node) -> int:
        self.nodes.append(node)
        self.output = len(self.nodes) - 1
        return self.output

    def affine(
        self, src: int, weight: np.ndarray, bias: np.ndarray | None = None, where: str = "", operator: object = None
    ) -> int:
        """W v + b (a 1-D `weight` is a diagonal map); `operator`: W's structured form when known (e.g. a
        `lipsdp.conv.Conv2d` whose matrix is W), kept on the lowered layer that is exactly W."""
        (src,) = self._check([src], where)
        w = dense(weight) if is_sparse(weight) else np.asarray(weight, dtype=np.float64)  # the lowering is dense
        n_in = self.size(src)
        if w.ndim not in (1, 2) or w.shape[-1] != n_in or w.size == 0:
            raise InvalidNetworkError(f"{where}: a weight of shape {w.shape} does not take the {n_in} values it receives")
        n_out = w.shape[0]
        b = np.zeros(n_out) if bias is None else np.broadcast_to(np.asarray(bias, dtype=np.float64), (n_out,)).copy()
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise InvalidNetworkError(f"{where}: weight or bias contains NaN or infinite values")
        return self._push(Node("affine", (src,), n_out, where, weight=w, bias=b, operator=operator))

    def constant(self, value: np.ndarray, where: str = "") -> int:
        v = np.asarray(value, dtype=np.float64).reshape(-1)
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise InvalidNetworkError(f"{where}: a constant must be finite and non-empty")
        return self._push(Node("const", (), v.size, where, bias=v.copy()))

    def activation(self, src: int, act: Activation | str, where: str = "") -> int:
        (src,) = self._check([src], where)
        act = activation(act) if isinstance(act, str) else act
        if isinstance(act, GroupSort):
            return self.groupsort(src, consecutive_groups(self.size(src), int(act.param), where), act.descending, where)
        if isinstance(act, Mixed) or act.name == "reflect":
            raise InvalidNetworkError(f"{where}: a graph activation applies to every entry (not {act.name})")
        return self._push(Node("act", (src,), self.size(src), where, activation=act))

    def add(self, srcs: Sequence[int], where: str = "") -> int:
        """The sum of the inputs (all of one size)."""
        srcs = self._check(srcs, where)
        sizes = {self.size(s) for s in srcs}
        if len(sizes) != 1:
            raise InvalidNetworkError(f"{where}: adds vectors of sizes {sorted(sizes)}")
        return self._push(Node("add", srcs, sizes.pop(), where))

    def concat(self, srcs: Sequence[int], where: str = "") -> int:
        srcs = self._check(srcs, where)
        return self._push(Node("concat", srcs, sum(self.size(s) for s in srcs), where))

    def maxpool(self, src: int, windows: np.ndarray, where: str = "") -> int:
        """out_i = max over the entries >= 0 of row i of `windows` (indices into the input)."""
        (src,) = self._check([src], where)
        win = np.asarray(windows)
        if win.ndim != 2 or win.size == 0 or not np.issubdtype(win.dtype, np.integer):
            raise InvalidNetworkError(f"{where}: windows must be a 2-D integer array (outputs, entries)")
        win = win.astype(np.int64)
        if np.any(win >= self.size(src)) or np.any(win < -1) or np.any(np.all(win < 0, axis=1)):
            raise InvalidNetworkError(
                f"{where}: every window needs at least one entry, each an index below {self.size(src)} (-1: none)"
            )
        return self._push(Node("maxpool", (src,), win.shape[0], where, windows=win))

    def select(self, src: int, positions: np.ndarray, where: str = "") -> int:
        """The entries `positions` of the input, in that order (a 0/1 affine map: exact)."""
        flat = np.asarray(positions, dtype=np.int64).reshape(-1)
        pick = np.zeros((flat.size, self.size(src)))
        pick[np.arange(flat.size), flat] = 1.0
        return self.affine(src, pick, None, where)

    def extrema(self, first: int, second: int, which: Sequence[str], where: str = "") -> dict[str, int]:
        """Elementwise 'maximum' and/or 'minimum' of two inputs of one size (`group_extrema` of the pairs)."""
        m = self.size(first)
        pairs = np.stack([np.arange(m), m + np.arange(m)], axis=1)
        return self.group_extrema(self.concat([first, second], where), pairs, which, where)

    def group_extrema(self, src: int, groups: np.ndarray, which: Sequence[str], where: str = "") -> dict[str, int]:
        """The 'maximum' and/or 'minimum' of each row of `groups` (input positions). Both of groups of two
        form one comparator per group (`groupsort`: LipSDP-NSR holds (max, min) exactly); otherwise max
        pools (max(a, b) = b + relu(a - b), tighter for a lone max; min(x) = -max(-x))."""
        groups = np.asarray(groups, dtype=np.int64)
        if groups.shape[1] == 2 and set(which) == {"maximum", "minimum"}:
            ordered = self.groupsort(src, groups, True, where)  # per group: (max, min)
            return {"maximum": self.select(ordered, groups[:, 0], where),
                    "minimum": self.select(ordered, groups[:, 1], where)}
        out = {}
        if "maximum" in which:
            out["maximum"] = self.maxpool(src, groups, where)
        if "minimum" in which:
            negated = self.affine(src, -np.ones(self.size(src)), None, where)
            out["minimum"] = self.affine(self.maxpool(negated, groups, where), -np.ones(groups.shape[0]), None, where)
        return out

    def _groups(self, src: int, windows: np.ndarray, where: str) -> np.ndarray:
        win = np.asarray(windows)
        if win.ndim != 2 or win.size == 0 or win.shape[1] < 2 or not np.issubdtype(win.dtype, np.integer):
            raise InvalidNetworkError(f"{where}: groups must be a 2-D integer array (groups, size >= 2)")
        win = win.astype(np.int64)
        if np.any(win < 0) or np.any(win >= self.size(src)) or np.unique(win).size != win.size:
            raise InvalidNetworkError(f"{where}: groups must be disjoint positions below {self.size(src)}")
        return win

    def groupsort(self, src: int, windows: np.ndarray, descending: bool = False, where: str = "") -> int:
        """Sort the entries of each row of `windows` in place (MaxMin: pairs, descending)."""
        (src,) = self._check([src], where)
        win = self._groups(src, windows, where)
        return self._push(Node("groupsort", (src,), self.size(src), where, windows=win, descending=bool(descending)))

    def householder(self, src: int, windows: np.ndarray, vectors: np.ndarray, where: str = "") -> int:
        """z -> z if v'z >= 0 else z - 2 (v'z / v'v) v on each group z (row of `windows`, vector row of `vectors`)."""
        (src,) = self._check([src], where)
        win = self._groups(src, windows, where)
        vec = np.asarray(vectors, dtype=np.float64)
        if vec.ndim == 1:
            vec = np.broadcast_to(vec, win.shape).copy()
        if vec.shape != win.shape or not np.all(np.isfinite(vec)) or np.any(np.sum(vec * vec, axis=1) == 0):
            raise InvalidNetworkError(f"{where}: Householder vectors must be finite, nonzero, one per group")
        return self._push(Node("householder", (src,), self.size(src), where, windows=win, vectors=vec))

    # -- evaluation ---------------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Evaluate the DAG node by node on inputs of shape (n_0,) or (batch, n_0)."""
        x = np.asarray(x, dtype=np.float64)
        values: dict[int, np.ndarray] = {}
        for i in range(self.output + 1):
            node = self.nodes[i]
            if node.op == "input":
                values[i] = x
            elif node.op == "const":
                values[i] = np.broadcast_to(node.bias, x.shape[:-1] + (node.size,))
            elif node.op == "affine":
                v = values[node.inputs[0]]
                values[i] = (v * node.weight if node.weight.ndim == 1 else v @ node.weight.T) + node.bias
            elif node.op == "act":
                values[i] = apply_activation(node.activation, values[node.inputs[0]])
            elif node.op == "add":
                values[i] = sum(values[s] for s in node.inputs)
            elif node.op == "concat":
                values[i] = np.concatenate([values[s] for s in node.inputs], axis=-1)
            elif node.op == "maxpool":
                v = values[node.inputs[0]]
                gathered = np.where(node.windows >= 0, v[..., np.maximum(node.windows, 0)], -np.inf)
                values[i] = gathered.max(axis=-1)
            elif node.op == "groupsort":
                out = np.array(values[node.inputs[0]], dtype=np.float64)
                ordered = np.sort(out[..., node.windows], axis=-1)
                out[..., node.windows] = ordered[..., ::-1] if node.descending else ordered
                values[i] = out
            else:  # householder
                out = np.array(values[node.inputs[0]], dtype=np.float64)
                z = out[..., node.windows]
                c = np.sum(z * node.vectors, axis=-1, keepdims=True)
                out[..., node.windows] = z - 2.0 * np.minimum(c, 0.0) * node.vectors / np.sum(node.vectors**2, axis=1)[:, None]
                values[i] = out
        return np.asarray(values[self.output], dtype=np.float64)


def consecutive_groups(size: int, group: int, where: str = "") -> np.ndarray:
    """The rows (0..g-1), (g..2g-1), ...: GroupSort's groups of a layer of `size` (a multiple of g)."""
    if size % group:
        raise InvalidNetworkError(f"{where}: groups of {group} do not divide a layer of {size} neurons")
    return np.arange(size, dtype=np.int64).reshape(-1, group)


def _comparator_rounds(windows: np.ndarray, descending: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """A sorting network for each row of `windows`: per round, the positions (low, high) compared; after
    the comparator, low holds the min and high the max. For g a power of two, Batcher's bitonic sorter
    (log2 g (log2 g + 1) / 2 rounds, each pairing every entry, so every round is the same rotation and
    the layer norms stay 1); otherwise the odd-even transposition network (g rounds)."""
    g = windows.shape[1]
    rounds = []
    if g & (g - 1) == 0:
        i = np.arange(g)
        k = 2
        while k <= g:
            j = k // 2
            while j >= 1:
                partner = i ^ j
                first = i[partner > i]
                second = first ^ j
                up = (first & k) == 0  # this comparator sorts its pair ascending
                if descending:
                    up = ~up
                low = np.where(up, first, second)
                high = np.where(up, second, first)
                rounds.append((windows[:, low].reshape(-1), windows[:, high].reshape(-1)))
                j //= 2
            k *= 2
        return rounds
    for r in range(g):
        first = np.arange(r % 2, g - 1, 2)
        low, high = (first + 1, first) if descending else (first, first + 1)
        rounds.append((windows[:, low].reshape(-1), windows[:, high].reshape(-1)))
    return rounds


# -- the lowering ---------------------------------------------------------------------------------------
@dataclass
class _Expr:
    """The value A h_L[cols] + c: `a` is None (the identity), 1-D (a diagonal) or a (rows, len(cols)) matrix."""

    level: int
    cols: np.ndarray
    a: np.ndarray | None
    c: np.ndarray
    op: object | None = None  # the structured operator whose matrix `a` is, on every neuron of the level

    @property
    def rows(self) -> int:
        return self.c.size

    def matrix(self) -> np.ndarray:
        if self.a is None:
            return np.eye(self.rows)
        return np.diag(self.a) if self.a.ndim == 1 else self.a

    def take(self, idx: np.ndarray) -> _Expr:
        """The rows `idx`."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.a is None or self.a.ndim == 1:
            a = None if self.a is None else self.a[idx]
            return _Expr(self.level, self.cols[idx], a, self.c[idx])
        return _Expr(self.level, self.cols, self.a[idx], self.c[idx])


def _compose(w: np.ndarray, a: np.ndarray | None) -> np.ndarray:
    """The matrix (or diagonal) of w after a (each None / 1-D diagonal / 2-D)."""
    if a is None:
        return w
    if w.ndim == 1:
        return w * a if a.ndim == 1 else w[:, None] * a
    return w * a[None, :] if a.ndim == 1 else w @ a


def _scatter(out: np.ndarray, rows: np.ndarray, pos: np.ndarray, e: _Expr) -> None:
    """out[rows][:, pos] += the matrix of e (pos: the places of e.cols among out's columns)."""
    if e.a is None or e.a.ndim == 1:
        np.add.at(out, (rows, pos), 1.0 if e.a is None else e.a)
    elif np.unique(pos).size == pos.size:
        out[np.ix_(rows, pos)] += e.a
    else:  # a neuron read twice (overlapping windows): accumulate
        np.add.at(out, np.ix_(rows, pos), e.a)


@dataclass
class _Block:
    """Neurons start..start+rows of a layer: pre-activation `pre` (an expression of the layer before)."""

    start: int
    pre: _Expr
    passthrough: bool
    flip: np.ndarray | None = None  # in a reflect layer: which rows apply |.|


@dataclass
class _Layer:
    size: int = 0
    base: Activation | None = None
    blocks: list[_Block] = field(default_factory=list)
    carried: dict[int, int] = field(default_factory=dict)  # neuron j of the layer before -> its pass-through here


_REFLECT = Activation("reflect", -1.0, 1.0)  # the base of a reflect layer while it is built


class _Lowering:
    def __init__(self, n_in: int) -> None:
        self.layers = [_Layer(size=n_in)]

    def layer(self, level: int) -> _Layer:
        while len(self.layers) <= level:
            self.layers.append(_Layer())
        return self.layers[level]

    def neurons(self, level: int, pre: _Expr, passthrough: bool) -> np.ndarray:
        """New neurons in layer `level` with pre-activations `pre` (an expression of layer level - 1)."""
        layer = self.layer(level)
        start = layer.size
        layer.blocks.append(_Block(start, pre, passthrough))
        layer.size += pre.rows
        return np.arange(start, layer.size, dtype=np.int64)

    def passthrough(self, level: int, cols: np.ndarray) -> np.ndarray:
        """Pass-through neurons in layer `level` carrying neurons `cols` of the layer before (reused)."""
        layer = self.layer(level)
        missing = np.array([j for j in dict.fromkeys(cols.tolist()) if j not in layer.carried], dtype=np.int64)
        if missing.size:
            made = self.neurons(level, _Expr(level - 1, missing, None, np.zeros(missing.size)), True)
            layer.carried.update(zip(missing.tolist(), made.tolist()))
        return np.array([layer.carried[j] for j in cols.tolist()], dtype=np.int64)

    def step(self, e: _Expr, by_rows: bool = False) -> _Expr:
        """The same value one layer later, through pass-through neurons."""
        if e.a is not None and e.a.ndim == 2:
            used = np.any(e.a != 0, axis=0)
            if not used.all():
                e = _Expr(e.level, e.cols[used], e.a[:, used], e.c)
        if not by_rows and (e.a is None or e.a.ndim == 1 or e.cols.size <= e.rows):
            return _Expr(e.level + 1, self.passthrough(e.level + 1, e.cols), e.a, e.c)
        return _Expr(e.level + 1, self.neurons(e.level + 1, e, True), None, np.zeros(e.rows))

    def carry(self, e: _Expr, level: int) -> _Expr:
        while e.level < level:
            e = self.step(e)
        return e

    def reflect(self, e: _Expr, a: np.ndarray, flip: np.ndarray, b: np.ndarray) -> _Expr:
        """B phi(A e) with phi = |.| on the rows `flip` of A e and the identity on the others: the values of
        a norm-preserving operation (a `Reflect` layer, its own layer of the chain)."""
        pre = self.affine(e, a, np.zeros(a.shape[0]))
        level = pre.level + 1
        while level < len(self.layers) and self.layers[level].base not in (None, _REFLECT):
            level += 1
        pre = self.carry(pre, level - 1)
        layer = self.layer(level)
        layer.base = _REFLECT
        rows = self.neurons(level, pre, False)
        layer.blocks[-1].flip = np.asarray(flip, dtype=bool)
        return self.affine(_Expr(level, rows, None, np.zeros(rows.size)), b, np.zeros(b.shape[0]))

    def groupsort(self, e: _Expr, windows: np.ndarray, descending: bool) -> _Expr:
        """Rounds of comparators (module docstring): pairs (s, d) = (a + b, a - b), the rest passed on."""
        n = e.rows
        for low, high in _comparator_rounds(windows, descending):
            k = low.size
            rest = np.setdiff1d(np.arange(n), np.concatenate([low, high]))
            a = np.zeros((2 * k + rest.size, n))
            pair = np.arange(k)
            a[pair, low] = a[pair, high] = 1.0  # s
            a[k + pair, low], a[k + pair, high] = 1.0, -1.0  # d
            a[2 * k + np.arange(rest.size), rest] = 1.0
            flip = np.zeros(a.shape[0], dtype=bool)
            flip[k:2 * k] = True
            b = np.zeros((n, a.shape[0]))
            b[high, pair] = b[high, k + pair] = b[low, pair] = 0.5
            b[low, k + pair] = -0.5
            b[rest, 2 * k + np.arange(rest.size)] = 1.0
            e = self.reflect(e, a, flip, b)
        return e

    def householder(self, e: _Expr, windows: np.ndarray, vectors: np.ndarray) -> _Expr:
        """z - (v'z - |v'z|) v / v'v per group: the group's identity neurons and one |.| neuron v'z."""
        n, (groups, g) = e.rows, windows.shape
        rest = np.setdiff1d(np.arange(n), windows.reshape(-1))
        a = np.zeros((n + groups, n))
        a[np.arange(n), np.arange(n)] = 1.0
        a[n + np.arange(groups)[:, None], windows] = vectors
        flip = np.zeros(n + groups, dtype=bool)
        flip[n:] = True
        b = np.zeros((n, n + groups))
        b[rest, rest] = 1.0
        scaled = vectors / np.sum(vectors * vectors, axis=1)[:, None]  # v / v'v
        for i in range(groups):
            w = windows[i]
            b[np.ix_(w, w)] = np.eye(g) - np.outer(scaled[i], vectors[i])
            b[w, n + i] = scaled[i]
        return self.reflect(e, a, flip, b)

    def activate(self, e: _Expr, act: Activation) -> _Expr:
        if act.name == "identity":
            return e
        level = e.level + 1
        while level < len(self.layers) and self.layers[level].base not in (None, act):
            level += 1
        e = self.carry(e, level - 1)
        self.layer(level).base = act
        return _Expr(level, self.neurons(level, e, False), None, np.zeros(e.rows))

    def affine(self, e: _Expr, w: np.ndarray, b: np.ndarray, operator: object = None) -> _Expr:
        whole = e.a is None and np.array_equal(e.cols, np.arange(self.layers[e.level].size))
        if operator is not None and whole and w.ndim == 2:
            return _Expr(e.level, e.cols, w, w @ e.c + b, operator)
        if w.ndim == 2 and e.a is not None and e.a.ndim == 2:
            used = int(np.count_nonzero(np.any(e.a != 0, axis=0)))
            if w.shape[0] * used > w.size + e.rows * used:  # the product would outgrow its factors
                e = self.step(e, by_rows=True)
        c = (w * e.c if w.ndim == 1 else w @ e.c) + b
        return _Expr(e.level, e.cols, _compose(w, e.a), c)

    def combine(self, exprs: list[_Expr], stack: bool) -> _Expr:
        """Sum (stack=False) or concatenation (stack=True) of expressions, all carried to one layer."""
        level = max(e.level for e in exprs)
        exprs = [self.carry(e, level) for e in exprs]
        if stack and all(e.a is None for e in exprs):
            cols = np.concatenate([e.cols for e in exprs])
            if np.unique(cols).size == cols.size:  # a selection of distinct neurons stays one
                return _Expr(level, cols, None, np.concatenate([e.c for e in exprs]))
        cols, inverse = np.unique(np.concatenate([e.cols for e in exprs]), return_inverse=True)
        rows = sum(e.rows for e in exprs) if stack else exprs[0].rows
        a = np.zeros((rows, cols.size))
        c = np.zeros(rows)
        offset = col = 0
        for e in exprs:
            pos = inverse[col:col + e.cols.size]
            col += e.cols.size
            where = np.arange(offset, offset + e.rows)
            _scatter(a, where, pos, e)
            c[where] += e.c
            if stack:
                offset += e.rows
        return _Expr(level, cols, a, c)

    def maxpool(self, e: _Expr, windows: np.ndarray) -> _Expr:
        """max over each window by a knockout tournament: max(a, b) = b + relu(a - b)."""
        relu = activation("relu")
        groups = [row[row >= 0] for row in windows]
        values = e
        while any(g.size > 1 for g in groups):
            first = np.concatenate([g[0:g.size - 1:2] for g in groups])  # a of each pair
            second = np.concatenate([g[1::2] for g in groups])  # b of each pair
            left = np.concatenate([g[-1:] if g.size % 2 else g[:0] for g in groups])  # an odd one out
            diff = self.combine([values.take(first), self.affine(values.take(second), -np.ones(second.size),
                                                                 np.zeros(second.size))], stack=False)
            r = self.activate(diff, relu)
            kept = self.carry(values.take(np.concatenate([second, left])), r.level)
            padded = _Expr(r.level, r.cols, None, np.zeros(r.rows))
            values = self.combine([self.combine([padded, self.constant_rows(r.level, left.size)], stack=True), kept],
                                  stack=False)
            new_groups, pair, odd = [], 0, second.size
            for g in groups:
                n_pairs = g.size // 2
                members = list(range(pair, pair + n_pairs))
                pair += n_pairs
                if g.size % 2:
                    members.append(odd)
                    odd += 1
                new_groups.append(np.array(members, dtype=np.int64))
            groups = new_groups
        return values.take(np.array([g[0] for g in groups], dtype=np.int64))

    @staticmethod
    def constant_rows(level: int, n: int) -> _Expr:
        return _Expr(level, np.zeros(0, dtype=np.int64), np.zeros((n, 0)), np.zeros(n))

    def network(self, out: _Expr) -> Network:
        depth = len(self.layers) - 1
        out = self.carry(out, depth)
        sizes = [layer.size for layer in self.layers]
        weights, biases, acts, ops = [], [], [], []
        for level in range(1, depth + 1):
            layer = self.layers[level]
            ops.append(_whole_operator(layer.blocks, sizes[level - 1]))
            w = np.zeros((layer.size, sizes[level - 1]))
            b = np.zeros(layer.size)
            identity = []
            for block in layer.blocks:
                rows = np.arange(block.start, block.start + block.pre.rows)
                _scatter(w, rows, block.pre.cols, block.pre)
                b[rows] = block.pre.c
                if block.passthrough:
                    identity.append(rows)
            weights.append(w)
            biases.append(b)
            if layer.base is _REFLECT:  # values carried past the layer stay pass-through neurons, [1, 1]
                flips = [block.start + np.flatnonzero(block.flip) for block in layer.blocks if block.flip is not None]
                acts.append(reflect(np.concatenate(flips) if flips else [], layer.size,
                                    np.concatenate(identity) if identity else []))
                continue
            base = layer.base if layer.base is not None else activation("identity")
            acts.append(mixed(base, np.concatenate(identity) if identity else [], layer.size))
        w = np.zeros((out.rows, sizes[depth]))
        _scatter(w, np.arange(out.rows), out.cols, out)
        weights.append(w)
        biases.append(out.c.copy())
        ops.append(_whole_operator([_Block(0, out, False)], sizes[depth]))
        return Network.from_arrays(weights, acts, biases, ops)


def _whole_operator(blocks: list[_Block], n_in: int) -> object | None:
    """The structured operator of a layer made of one block whose matrix is exactly that operator's."""
    if len(blocks) != 1 or blocks[0].passthrough or blocks[0].pre.op is None:
        return None
    pre = blocks[0].pre
    return pre.op if np.array_equal(pre.cols, np.arange(n_in)) else None


def fused_activations(graph: Graph, live: set[int]) -> set[int]:
    """Activation nodes whose only reader is a max pool (moved after it, see the module docstring; the
    factoring at max pools, `lipsdp.compose`, moves the same ones)."""
    readers: dict[int, list[int]] = {}
    for i in live:
        for s in graph.nodes[i].inputs:
            readers.setdefault(s, []).append(i)
    fused = set()
    for i in live:
        node = graph.nodes[i]
        if node.op != "act" or i == graph.output or node.activation.alpha < 0:
            continue
        users = readers.get(i, [])
        if len(users) == 1 and graph.nodes[users[0]].op == "maxpool":
            fused.add(i)
    return fused


def to_network(graph: Graph) -> Network:
    """The chain `Network` computing the graph's function (see the module docstring for the construction
    and why every method's bound for it is a bound for the graph)."""
    live = {graph.output}
    for i in range(graph.output, -1, -1):
        if i in live:
            live.update(graph.nodes[i].inputs)
    fused = fused_activations(graph, live)
    low = _Lowering(graph.nodes[0].size)
    values: dict[int, _Expr] = {}
    for i in sorted(live):
        node = graph.nodes[i]
        if i in fused:
            continue
        if node.op == "input":
            values[i] = _Expr(0, np.arange(node.size, dtype=np.int64), None, np.zeros(node.size))
        elif node.op == "const":
            values[i] = _Expr(0, np.zeros(0, dtype=np.int64), np.zeros((node.size, 0)), node.bias.copy())
        elif node.op == "affine":
            values[i] = low.affine(values[node.inputs[0]], node.weight, node.bias, node.operator)
        elif node.op == "act":
            values[i] = low.activate(values[node.inputs[0]], node.activation)
        elif node.op in ("add", "concat"):
            values[i] = low.combine([values[s] for s in node.inputs], stack=node.op == "concat")
        elif node.op == "groupsort":
            values[i] = low.groupsort(values[node.inputs[0]], node.windows, node.descending)
        elif node.op == "householder":
            values[i] = low.householder(values[node.inputs[0]], node.windows, node.vectors)
        elif node.op == "maxpool":
            src = node.inputs[0]
            if src in fused:  # MaxPool(phi(z)) = phi(MaxPool(z))
                inner = graph.nodes[src]
                pooled = low.maxpool(values[inner.inputs[0]], node.windows)
                values[i] = low.activate(pooled, inner.activation)
            else:
                values[i] = low.maxpool(values[src], node.windows)
        else:
            raise InvalidNetworkError(f"{node.where}: unknown graph operation '{node.op}'")
    return low.network(values[graph.output])
