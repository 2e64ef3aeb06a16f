"""The NNet reader: the ACAS Xu network against its verified .npz conversion, and a tiny net with an exact
constant in normalised and in raw units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lipsdp
from lipsdp import ModelLoadError
from lipsdp.io.nnet import NNetNetwork, load_nnet

FC = Path(__file__).resolve().parents[2] / "shared" / "realnets" / "fc"
ACAS = FC / "ACASXU_run2a_4_5_batch_2000.nnet"
needs_realnets = pytest.mark.skipif(not ACAS.is_file(), reason="../shared/realnets is not available")

# f_n(z) = 3 relu(z_0) + 4 relu(2 z_1): L = ||(3, 8)|| = sqrt(73) (all-active region reachable, no biases).
# Raw units: z = ((x_0 - 1) / 2, (x_1 + 1) / 4), y = 10 f_n + 5: gradient 10 (3/2, 8/4), L = 25.
TINY = """// a hand-written NNet file
// numLayers, inputSize, outputSize, maxLayerSize
2,2,1,2,
2,2,1,
0,
-10.0,-10.0,
10.0,10.0,
1.0,-1.0,5.0,
2.0,4.0,10.0,
1.0,0.0,
0.0,2.0,
0.0,
0.0,
3.0,4.0,
0.0,
"""


def numpy_forward(weights, biases, x):
    """An independent ReLU-chain evaluation (hidden ReLU, affine output)."""
    h = x
    for k, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w.T + b
        if k < len(weights) - 1:
            h = np.maximum(h, 0.0)
    return h


@needs_realnets
def test_acasxu_matches_the_verified_npz():
    net = load_nnet(ACAS)
    ref = np.load(FC / "acasxu_4_5_nnet.npz")
    assert net.sizes == [5, 50, 50, 50, 50, 50, 50, 5]
    assert [a.name for a in net.activations] == ["relu"] * 6
    for k in range(7):
        np.testing.assert_array_equal(net.weights[k], ref[f"W{k}"])
        np.testing.assert_array_equal(net.biases[k], ref[f"b{k}"])
    norm = net.normalization
    np.testing.assert_allclose(norm.input_range, [60261.0, 2 * np.pi, 2 * np.pi, 1100.0, 1200.0], rtol=1e-9)
    assert norm.output_range == 373.94992 and norm.output_mean == pytest.approx(7.519, abs=1e-3)
    np.testing.assert_array_equal(norm.input_min, [0.0, -3.141593, -3.141593, 100.0, 0.0])
    assert net.units == "normalized"
    # The same network through the loader dispatch, with the same bound as the .npz.
    assert lipsdp.estimate(str(ACAS), "naive").upper == lipsdp.estimate(FC / "acasxu_4_5_nnet.npz", "naive").upper


@needs_realnets
def test_acasxu_raw_units():
    """y = 373.95 f_n((x - mean) / range) + 7.519 on inputs inside [min, max], computed from the .npz."""
    ref = np.load(FC / "acasxu_4_5_nnet.npz")
    weights, biases = [ref[f"W{k}"] for k in range(7)], [ref[f"b{k}"] for k in range(7)]
    raw = lipsdp.load_network(ACAS, nnet_units="raw")
    assert isinstance(raw, NNetNetwork) and raw.units == "raw"
    norm = raw.normalization
    rng = np.random.default_rng(0)
    x = norm.input_min + rng.random((200, 5)) * (norm.input_max - norm.input_min)
    expected = 373.94992 * numpy_forward(weights, biases, (x - norm.input_mean) / norm.input_range) + norm.output_mean
    np.testing.assert_allclose(raw.forward(x), expected, rtol=1e-10, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(raw.raw_forward(x), expected, rtol=1e-10, atol=1e-9 * np.abs(expected).max())
    # Outside the box the NNet evaluation clips first; raw_forward does too, forward does not.
    far = norm.input_max + 1000.0
    np.testing.assert_allclose(raw.raw_forward(far), raw.forward(norm.input_max), rtol=1e-12)
    # The naive bound scales as expected: range_out * prod ||W_k|| with W_0 scaled by 1/range_in.
    w0 = weights[0] / norm.input_range
    naive = 373.94992 * np.linalg.norm(w0, 2) * np.prod([np.linalg.norm(w, 2) for w in weights[1:]])
    assert lipsdp.estimate(raw, "naive").upper == pytest.approx(naive, rel=1e-9)


@pytest.mark.parametrize("units,exact", [("normalized", np.sqrt(73.0)), ("raw", 25.0)])
def test_tiny_net_exact_constant(tmp_path, units, exact):
    path = tmp_path / "tiny.nnet"
    path.write_text(TINY)
    net = lipsdp.load_network(path, nnet_units=units)
    assert net.sizes == [2, 2, 1]
    x = np.array([[3.0, 5.0], [-1.0, 0.5]])
    raw_expected = 10.0 * (3 * np.maximum((x[:, 0] - 1) / 2, 0) + 8 * np.maximum((x[:, 1] + 1) / 4, 0)) + 5.0
    np.testing.assert_allclose(net.raw_forward(x).ravel(), raw_expected, rtol=1e-14)
    res = lipsdp.estimate(net, "neuron", lower=True)
    assert res.lower == pytest.approx(exact, rel=1e-9)
    assert exact <= res.upper <= exact * (1 + 1e-5)


def test_estimate_takes_the_units_option(tmp_path):
    path = tmp_path / "tiny.nnet"
    path.write_text(TINY)
    # naive: ||diag(1, 2)|| ||(3, 4)|| = 10; in raw units ||diag(1/2, 2/4)|| ||10 (3, 4)|| = 25.
    normalized = lipsdp.estimate(path, "naive").upper
    raw = lipsdp.estimate(path, "naive", nnet_units="raw").upper
    assert 10.0 <= normalized <= 10.0 * (1 + 1e-9)  # verified: a rounding margin above the exact product
    assert 25.0 <= raw <= 25.0 * (1 + 1e-9)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.replace("2,2,1,2,", "2,2,x,2,"), "'x' is not a number"),
        (lambda t: t.replace("2,2,1,\n0,", "3,2,1,\n0,"), "do not start with inputSize 2"),
        (lambda t: t.replace("3.0,4.0,\n", "3.0,\n"), "need 9 weights and biases, but the file has 8"),
        (lambda t: t.replace("2.0,4.0,10.0,", "2.0,0.0,10.0,"), "ranges must be positive"),
        (lambda t: t.replace("1.0,-1.0,5.0,", "1.0,"), "1 means, need at least 3"),
        (lambda t: t.replace("0.0,2.0,", "0.0,nan,"), "NaN or infinite"),
        (lambda t: "\n".join(t.splitlines()[:6]), "too short"),
    ],
)
def test_malformed_files(tmp_path, edit, message):
    path = tmp_path / "bad.nnet"
    path.write_text(edit(TINY))
    with pytest.raises(ModelLoadError, match=message) as info:
        lipsdp.load_network(path)
    assert "bad.nnet" in str(info.value)


def test_unknown_units(tmp_path):
    path = tmp_path / "tiny.nnet"
    path.write_text(TINY)
    with pytest.raises(ModelLoadError, match="'normalized' or 'raw'"):
        lipsdp.load_network(path, nnet_units="metres")
