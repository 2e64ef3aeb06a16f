"""MaxMin, GroupSort and Householder layers (LipSDP-NSR, issue 13) against independent truths.

Truths used: a norm-preserving layer between orthogonal maps is exactly 1-Lipschitz; exact region
enumeration of small MaxMin / GroupSort nets with 1-D and 2-D inputs (written here on the original layers,
sharing nothing with the lowering); the function computed directly with numpy sorts; the product of layer
norms (MaxMin is 1-Lipschitz); and the same net written as a residual ReLU net (max(a, b) = b + relu(a - b))
bounded by LipSDP-Neuron, which the NSR constraints must match or beat.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import _area, _clip  # polygon clipping of the exact 2-D enumeration
from scipy.stats import ortho_group

import lipsdp
from lipsdp.errors import InvalidNetworkError, LipSDPError
from lipsdp.graph import Graph, consecutive_groups, to_network
from lipsdp.io.chain import build_from_arrays

MAXMIN_DIR = Path(__file__).resolve().parents[2] / "shared" / "realnets" / "maxmin"
METHODS = ("naive", "sequential", "layer", "neuron", "anytime")
QUICK_LOWER = {"lower_samples": 64, "lower_steps": 20}  # a lower bound is below the truth however it is searched


def _sort_layer(h: np.ndarray, group: int, descending: bool) -> np.ndarray:
    out = np.sort(h.reshape(h.shape[:-1] + (-1, group)), axis=-1)
    return (out[..., ::-1] if descending else out).reshape(h.shape)


def reference_forward(weights, biases, group: int, descending: bool, x: np.ndarray) -> np.ndarray:
    h = x
    for k, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w.T + b
        if k < len(weights) - 1:
            h = _sort_layer(h, group, descending)
    return h


def groupsort_net(weights, biases=None, group: int = 2, descending: bool = True):
    """The lowered chain of a GroupSort MLP: through the file loaders' route for the named activations
    ('maxmin', 'groupsort:g' ascending), through a `Graph` otherwise."""
    if (group == 2 and descending) or not descending:
        return build_from_arrays("test", weights, biases, "maxmin" if descending else f"groupsort:{group}")
    g = Graph(weights[0].shape[1])
    node = 0
    for k, w in enumerate(weights):
        node = g.affine(node, w, None if biases is None else biases[k])
        if k < len(weights) - 1:
            node = g.groupsort(node, consecutive_groups(w.shape[0], group), descending=True)
    return to_network(g)


def _orthogonal_net(n: int, depth: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [ortho_group.rvs(n, random_state=rng) for _ in range(depth)]


# -- exact constants by region enumeration (independent of lipsdp) -------------------------------------
def _permutation_slope(z_slope: np.ndarray, z_mid: np.ndarray, group: int, descending: bool) -> np.ndarray:
    """The slope of the sorted layer on a piece where the order of every group is that of z_mid."""
    order = np.argsort(z_mid.reshape(-1, group), axis=1, kind="stable")
    if descending:
        order = order[:, ::-1]
    idx = (order + group * np.arange(order.shape[0])[:, None]).reshape(-1)
    return z_slope[idx]


def exact_1d(weights, biases, group: int, descending: bool) -> float:
    """Exact constant of a GroupSort MLP with scalar input: pieces cut where two entries of a group meet."""
    pieces = [(-np.inf, np.inf, np.ones(1), np.zeros(1))]
    for k in range(len(weights) - 1):
        w, b = weights[k], biases[k]
        new = []
        for lo, hi, a, c in pieces:
            za, zc = w @ a, w @ c + b
            ga, gc = za.reshape(-1, group), zc.reshape(-1, group)
            i, j = np.triu_indices(group, 1)
            da, dc = (ga[:, i] - ga[:, j]).reshape(-1), (gc[:, i] - gc[:, j]).reshape(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                roots = -dc / da
            cuts = np.unique(roots[np.isfinite(roots) & (roots > lo) & (roots < hi)])
            for left, right in pairwise(np.concatenate([[lo], cuts, [hi]])):
                mid = (0.0 if np.isinf(left) and np.isinf(right) else right - 1.0 if np.isinf(left)
                       else left + 1.0 if np.isinf(right) else 0.5 * (left + right))
                zm = za * mid + zc
                new.append((left, right, _permutation_slope(za, zm, group, descending),
                            _permutation_slope(zc, zm, group, descending)))
        pieces = new
    return max(float(np.linalg.norm(weights[-1] @ a)) for _, _, a, _ in pieces)


def exact_2d(weights, biases, group: int, descending: bool, box: float = 50.0) -> float:
    """Exact constant over [-box, box]^2 of a GroupSort MLP with 2-D input (polygons cut by every line
    where two entries of a group meet)."""
    square = np.array([[-box, -box], [box, -box], [box, box], [-box, box]], dtype=float)
    pieces = [(square, np.eye(2), np.zeros(2))]
    for k in range(len(weights) - 1):
        w, b = weights[k], biases[k]
        new = []
        for poly, a, c in pieces:
            za, zc = w @ a, w @ c + b
            parts = [poly]
            for g0 in range(0, za.shape[0], group):
                for i in range(g0, g0 + group):
                    for j in range(i + 1, g0 + group):
                        parts = [sub for part in parts for sign in (1.0, -1.0)
                                 if _area(sub := _clip(part, sign * (za[i] - za[j]), sign * (zc[i] - zc[j]))) > 1e-12]
            for part in parts:
                zm = za @ part.mean(axis=0) + zc
                new.append((part, _permutation_slope(za, zm, group, descending),
                            _permutation_slope(zc, zm, group, descending)))
        pieces = new
    return max(float(np.linalg.norm(weights[-1] @ a, 2)) for _, a, _ in pieces)


# -- tests -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("group", "descending"), [(2, True), (2, False), (3, False), (4, False), (4, True), (8, False)])
def test_lowering_computes_the_function(group, descending):
    rng = np.random.default_rng(group)
    n = 24
    weights = [rng.standard_normal((n, 5)), rng.standard_normal((n, n)), rng.standard_normal((3, n))]
    biases = [rng.standard_normal(w.shape[0]) for w in weights]
    net = groupsort_net(weights, biases, group, descending)
    x = rng.standard_normal((50, 5)) * 3
    np.testing.assert_allclose(net.forward(x), reference_forward(weights, biases, group, descending, x),
                               rtol=1e-12, atol=1e-12)
    assert all(a.name == "reflect" for a in net.activations)


def test_single_maxmin_is_exactly_one_lipschitz():
    """1 up to each tier's certificate margin (the LMI tiers prove within ~1e-8)."""
    net = groupsort_net([np.eye(6), np.eye(6)])
    for method in METHODS:
        res = lipsdp.estimate(net, method, **({"budget": 60} if method == "anytime" else {}))
        assert 1.0 <= res.upper <= 1.0 + 1e-7, (method, res.upper)
    assert lipsdp.estimate(net, "neuron", lower=True, lower_samples=8, lower_steps=0).lower == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("group", "descending"), [(2, True), (3, False), (4, False)])
def test_orthogonal_layers_give_exactly_one(group, descending):
    """Norm-preserving layers between orthogonal maps: L = 1, and LipSDP-NSR proves it (LipSDP-Neuron
    with the residual ReLU form only approaches 1 as its pass-through multipliers grow without bound).
    The LMI is exactly zero at its optimum here (a degenerate SDP), so no gap is asserted: the Jacobian
    lower bound 1 already shows the upper bound is tight."""
    net = groupsort_net(_orthogonal_net(12, 4, seed=group), None, group, descending)
    # every Jacobian is an orthogonal matrix times permutations: a few samples find the lower bound 1
    res = lipsdp.estimate(net, "neuron", lower=True, lower_samples=8, lower_steps=0)
    assert 1.0 - 1e-12 <= res.lower <= 1.0 + 1e-12
    assert 1.0 <= res.upper <= 1.0 + 1e-6
    if group & (group - 1) == 0:  # every comparator round is a rotation: the layer norms are 1
        for method in ("naive", "sequential", "layer"):
            assert 1.0 <= lipsdp.estimate(net, method).upper <= 1.0 + 1e-6, method


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("group", "descending"), [(2, True), (3, False), (4, True)])
def test_exact_constant_within_bounds_1d(seed, group, descending):
    rng = np.random.default_rng(seed)
    n = 4 * 3 if group == 3 else 8
    weights = [rng.standard_normal((n, 1)), rng.standard_normal((n, n)) / 2, rng.standard_normal((2, n))]
    biases = [rng.standard_normal(w.shape[0]) for w in weights]
    exact = exact_1d(weights, biases, group, descending)
    net = groupsort_net(weights, biases, group, descending)
    assert lipsdp.estimate(net, "neuron", lower=True, **QUICK_LOWER).lower <= exact * (1 + 1e-9)
    for method in METHODS if seed == 0 else METHODS[:-1]:  # anytime (timed) on one seed per case
        upper = lipsdp.estimate(net, method, **({"budget": 2} if method == "anytime" else {})).upper
        assert upper >= exact * (1 - 1e-12), (method, upper, exact)


@pytest.mark.parametrize("seed", range(3))
def test_exact_constant_within_bounds_2d(seed):
    rng = np.random.default_rng(10 + seed)
    weights = [rng.standard_normal((6, 2)), rng.standard_normal((6, 6)) / 2, rng.standard_normal((2, 6))]
    biases = [rng.standard_normal(w.shape[0]) * 0.5 for w in weights]
    exact = exact_2d(weights, biases, 2, True)
    net = groupsort_net(weights, biases)
    res = lipsdp.estimate(net, "neuron", lower=True, **QUICK_LOWER)
    assert res.lower <= exact * (1 + 1e-9) <= res.upper * (1 + 2e-9)
    assert res.upper <= lipsdp.estimate(net, "naive").upper * (1 + 1e-9)


def test_householder_layer_function_and_soundness():
    rng = np.random.default_rng(3)
    n = 8
    g = Graph(3)
    node = g.affine(0, rng.standard_normal((n, 3)), rng.standard_normal(n))
    vectors = rng.standard_normal((2, 4))
    node = g.householder(node, consecutive_groups(n, 4), vectors)
    g.affine(node, rng.standard_normal((2, n)))
    net = to_network(g)
    x = rng.standard_normal((40, 3)) * 2
    np.testing.assert_allclose(net.forward(x), g.forward(x), rtol=1e-12, atol=1e-12)
    res = lipsdp.estimate(net, "neuron", lower=True, **QUICK_LOWER)
    assert res.lower <= res.upper <= lipsdp.estimate(net, "naive").upper * (1 + 1e-9)


def test_groupsort_is_not_a_chain_activation():
    with pytest.raises(InvalidNetworkError, match="not elementwise"):
        lipsdp.Network.from_arrays([np.eye(4), np.eye(4)], "maxmin")
    with pytest.raises(InvalidNetworkError, match="do not divide"):
        build_from_arrays("x", [np.eye(5), np.eye(5)], None, "groupsort:2")
    with pytest.raises(InvalidNetworkError, match="group size"):
        build_from_arrays("x", [np.eye(4), np.eye(4)], None, "groupsort:1")


def test_mat_and_npz_files_with_the_activation_named(tmp_path):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((8, 5)), rng.standard_normal((8, 8)), rng.standard_normal((3, 8))]
    cell = np.empty((1, 3), dtype=object)
    for k, w in enumerate(weights):
        cell[0, k] = w
    scipy.io.savemat(tmp_path / "pauli.mat", {"W": cell})  # Pauli et al.'s layout: W only
    from lipsdp.io import load_network
    from lipsdp.io.arrays import save_npz

    net = load_network(tmp_path / "pauli.mat", activation="maxmin")
    x = rng.standard_normal((20, 5))
    np.testing.assert_allclose(net.forward(x), reference_forward(weights, [np.zeros(8)] * 2 + [np.zeros(3)], 2, True, x),
                               rtol=1e-12, atol=1e-12)
    save_npz(net, tmp_path / "lowered.npz")  # Reflect layers keep their |.| neurons (flip{k})
    back = load_network(tmp_path / "lowered.npz")
    np.testing.assert_array_equal(back.forward(x), net.forward(x))
    assert [a.flip for a in back.activations] == [a.flip for a in net.activations]
    np.savez(tmp_path / "named.npz", W0=weights[0], W1=weights[1], W2=weights[2], activations=np.array(["maxmin"]))
    np.testing.assert_array_equal(load_network(tmp_path / "named.npz").forward(x), net.forward(x))
    with pytest.raises(LipSDPError, match="disagrees"):
        load_network(tmp_path / "named.npz", activation="relu")
    with pytest.raises(LipSDPError, match="activation"):  # an ONNX file carries its activations
        load_network(tmp_path / "x.onnx", activation="maxmin")


def test_local_bounds_propagate_abs_correctly():
    """|.| is not monotone: interval propagation through a Reflect layer must still contain every value."""
    from lipsdp.region import Box, pre_activation_bounds

    rng = np.random.default_rng(5)
    weights = [rng.standard_normal((6, 3)), rng.standard_normal((6, 6)), rng.standard_normal((2, 6))]
    biases = [rng.standard_normal(w.shape[0]) for w in weights]
    net = groupsort_net(weights, biases)
    box = Box(-np.ones(3), np.ones(3))
    bounds = pre_activation_bounds(net, box)
    x = rng.uniform(-1, 1, size=(2000, 3))
    h = x
    for k in range(net.depth):
        z = h @ net.weights[k].T + net.biases[k]
        assert np.all(z >= bounds[k][0] - 1e-12) and np.all(z <= bounds[k][1] + 1e-12)
        h = lipsdp.network.apply_activation(net.activations[k], z)
    res = lipsdp.estimate(net, "neuron", region=box, lower=True, **QUICK_LOWER)
    assert res.lower <= res.upper


def test_certificate_of_a_maxmin_net_is_reproved_and_tampering_rejected(tmp_path):
    from lipsdp.io.arrays import save_npz
    from lipsdp.verify import verify

    rng = np.random.default_rng(4)
    net = groupsort_net([rng.standard_normal((6, 4)), rng.standard_normal((6, 6)), rng.standard_normal((2, 6))])
    save_npz(net, tmp_path / "m.npz")
    res = lipsdp.estimate(tmp_path / "m.npz", "neuron", lower=True, **QUICK_LOWER)
    assert res.upper < lipsdp.estimate(net, "naive").upper * (1 - 1e-3)  # the LMI proof, not the product
    res.save_certificate(tmp_path / "c.json")
    assert verify(tmp_path / "c.json", tmp_path / "m.npz").accepted
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["proof"]["kind"] == "lmi"
    rho = float.fromhex(data["proof"]["rho"])  # in the units of the proof's exact rescaling steps
    data["proof"]["rho"] = float.hex(rho * (res.lower / res.upper) ** 2 * (1 - 1e-6))  # below the true L^2
    (tmp_path / "t.json").write_text(json.dumps(data))
    assert not verify(tmp_path / "t.json", tmp_path / "m.npz").accepted
    data["proof"]["rho"] = float.hex(rho)
    data["proof"]["multipliers"][0] = float.hex(-float.fromhex(data["proof"]["multipliers"][0]))
    (tmp_path / "n.json").write_text(json.dumps(data))
    assert not verify(tmp_path / "n.json", tmp_path / "m.npz").accepted


# -- the shared MaxMin MLPs of Pauli et al. --------------------------------------------------------------
def _maxmin_graph(weights, residual: bool, relu_form: bool) -> Graph:
    """The MLP (every hidden layer followed by MaxMin), or the residual variant h = W_1 x,
    h <- h + MaxMin(W_k h), y = W_l h; MaxMin as comparators, or with max(a, b) = b + relu(a - b) and
    min(a, b) = -max(-a, -b) (max pools of pairs: the residual ReLU form)."""
    g = Graph(weights[0].shape[1])
    node = 0
    for k, w in enumerate(weights):
        pre = g.affine(node, w)
        if k == 0 and residual or k == len(weights) - 1:
            node = pre
            continue
        n = w.shape[0]
        pairs = consecutive_groups(n, 2)
        if relu_form:
            a, b = g.select(pre, pairs[:, 0]), g.select(pre, pairs[:, 1])
            mx, mn = g.extrema(a, b, ["maximum"])["maximum"], g.extrema(a, b, ["minimum"])["minimum"]
            perm = np.zeros((n, n))
            perm[pairs[:, 0], np.arange(n // 2)] = 1.0
            perm[pairs[:, 1], n // 2 + np.arange(n // 2)] = 1.0
            out = g.affine(g.concat([mx, mn]), perm)
        else:
            out = g.groupsort(pre, pairs, descending=True)
        node = g.add([node, out]) if residual else out
    return g


def _check_shared(name: str) -> None:
    path = MAXMIN_DIR / f"{name}.mat"
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared/realnets is optional)")
    weights = [np.asarray(w, dtype=float) for w in scipy.io.loadmat(path)["W"].reshape(-1)]
    residual = name.startswith("res")
    norms = [np.linalg.norm(w, 2) for w in weights]
    if residual:  # ||W_1|| prod (1 + ||W_k||) ||W_l||
        net = to_network(_maxmin_graph(weights, True, False))
        product = float(norms[0] * np.prod([1 + v for v in norms[1:-1]]) * norms[-1])
    else:
        net = lipsdp.io.load_network(path, activation="maxmin")
        x = np.random.default_rng(0).standard_normal((10, weights[0].shape[1]))
        zeros = [np.zeros(w.shape[0]) for w in weights]
        np.testing.assert_allclose(net.forward(x), reference_forward(weights, zeros, 2, True, x), rtol=1e-10, atol=1e-10)
        product = float(np.prod(norms))
    res = lipsdp.estimate(net, "neuron", lower=True)
    assert res.lower <= res.upper <= product * (1 + 1e-9)
    if not residual:  # (the residual net's skip neurons are exact identities: no proven gap there)
        assert res.gap is not None and res.gap <= 1e-4
    resrelu = lipsdp.estimate(to_network(_maxmin_graph(weights, residual, True)), "neuron")
    assert res.upper <= resrelu.upper * (1 + 1e-9)


def test_shared_maxmin_2fc_16():
    _check_shared("weights_l2_2fc_16")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["weights_l2_5fc_32", "weights_l2_8fc_64", "resweights_5_32"])
def test_shared_maxmin_deeper(name):
    _check_shared(name)


# -- front ends: torch (torch.export) and ONNX ----------------------------------------------------------
def _torch_models():
    import torch

    from lipsdp.nn import GroupSort, MaxMin

    class Halves(torch.nn.Module):  # MaxMin as many libraries write it: max and min of the two halves
        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    class Reductions(torch.nn.Module):  # the max and the min along an axis of the same pairs
        def forward(self, x):
            p = x.view(x.shape[0], -1, 2)
            return torch.cat([p.max(dim=-1).values, p.amin(dim=-1)], dim=1)

    class Strided(torch.nn.Module):  # even and odd features by strided slices, interleaved back by stack
        def forward(self, x):
            a, b = x[:, 0::2], x[:, 1::2]
            return torch.stack([torch.maximum(a, b), torch.minimum(a, b)], dim=2).flatten(1)

    return {"groupsort4": GroupSort(4), "maxmin": MaxMin(), "groupsort2-desc": GroupSort(2, descending=True),
            "halves": Halves(), "reductions": Reductions(), "strided": Strided()}


@pytest.mark.parametrize("kind", ["groupsort4", "maxmin", "groupsort2-desc", "halves", "reductions", "strided"])
def test_torch_modules_are_read_exactly(kind):
    import torch

    torch.manual_seed(0)
    act = _torch_models()[kind]
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), act, torch.nn.Linear(8, 8), act, torch.nn.Linear(8, 3))
    model = model.double().eval()
    net = lipsdp.io.load_network(model)
    x = np.random.default_rng(0).standard_normal((30, 5))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-12, atol=1e-12)
    assert all(a.name == "reflect" for a in net.activations)  # comparators: LipSDP-NSR layers
    res = lipsdp.estimate(model, "neuron", lower=True, **QUICK_LOWER)
    product = float(np.prod([np.linalg.norm(m.weight.detach().numpy(), 2) for m in model if hasattr(m, "weight")]))
    assert res.lower <= res.upper <= product * (1 + 1e-9)


def test_a_lone_max_stays_a_max_pool():
    """max along an axis without the min of the same pairs: max(a, b) = b + relu(a - b) (relu neurons)."""
    import torch

    class LoneMax(torch.nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], -1, 2).amax(dim=-1)

    model = torch.nn.Sequential(torch.nn.Linear(3, 8), LoneMax(), torch.nn.Linear(4, 2)).double().eval()
    net = lipsdp.io.load_network(model)
    assert [a.name for a in net.activations] == ["relu|identity"]
    x = np.random.default_rng(0).standard_normal((30, 3))
    with torch.no_grad():
        np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).numpy(), rtol=1e-12, atol=1e-12)


def test_torch_sort_indices_are_refused():
    import torch

    from lipsdp.errors import UnsupportedLayerError

    class Argsort(torch.nn.Module):
        def forward(self, x):
            return torch.sort(x, dim=1).indices.double()

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Argsort(), torch.nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedLayerError, match="indices"):
        lipsdp.io.load_network(model)


@pytest.mark.parametrize("kind", ["groupsort4", "maxmin", "halves", "reductions"])
def test_onnx_exports_are_read_exactly(tmp_path, kind):
    import torch

    pytest.importorskip("onnx")
    torch.manual_seed(1)
    act = _torch_models()[kind]
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), act, torch.nn.Linear(8, 3)).eval()
    path = tmp_path / "m.onnx"
    # TopK; Gather or Split, then Max and Min; ReduceMax and ReduceMin
    torch.onnx.export(model, (torch.zeros(1, 5),), path, dynamo=False)
    net = lipsdp.io.load_network(path)
    assert all(a.name == "reflect" for a in net.activations)
    x = np.random.default_rng(0).standard_normal((30, 5)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(net.forward(x.astype(np.float64)), expected, rtol=1e-5, atol=1e-5)


def test_cli_reads_a_pauli_file_with_the_activation_named(tmp_path):
    from typer.testing import CliRunner

    from lipsdp.cli import app

    rng = np.random.default_rng(2)
    cell = np.empty((1, 2), dtype=object)
    cell[0, 0], cell[0, 1] = rng.standard_normal((6, 4)), rng.standard_normal((2, 6))
    scipy.io.savemat(tmp_path / "w.mat", {"W": cell})
    out = CliRunner().invoke(app, ["estimate", str(tmp_path / "w.mat"), "--activation", "maxmin", "--json",
                                   "--certificate", str(tmp_path / "certs")])
    assert out.exit_code == 0, out.output
    row = json.loads(out.output)[0] if out.output.lstrip().startswith("[") else json.loads(out.output)
    assert row["verified"] and "reflect" in row["network"]
    cert = next((tmp_path / "certs").glob("*.json"))
    ok = CliRunner().invoke(app, ["verify", str(cert), str(tmp_path / "w.mat"), "--activation", "maxmin"])
    assert ok.exit_code == 0 and "accepted" in ok.output
    wrong = CliRunner().invoke(app, ["verify", str(cert), str(tmp_path / "w.mat")])  # read as relu: another net
    assert wrong.exit_code == 1
