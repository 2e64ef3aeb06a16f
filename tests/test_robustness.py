"""Class-pair bounds and certified radii, checked against attacks and the true distance to the decision
boundary of small trained classifiers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import he_network
from torch import nn

import lipsdp
from lipsdp import LipSDPError, load_network
from lipsdp.lower import jacobian_norms
from lipsdp.network import pair_network
from lipsdp.robustness import pair_bounds


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def blobs():
    """A 2-16-16-3 ReLU classifier trained on three overlapping Gaussian blobs, with held-out points."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 1.0], [-1.0, -0.6], [1.0, -0.6]])
    y = rng.integers(0, 3, 600)
    x = centres[y] + 0.7 * rng.standard_normal((600, 2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    train(model, x[:400], y[:400], steps=300, seed=0)
    return load_network(model), x[400:480], y[400:480]


def pgd_flips(net, x: np.ndarray, labels: np.ndarray, eps: np.ndarray, steps: int = 60, restarts: int = 3,
              seed: int = 0) -> np.ndarray:
    """l2 PGD on the margin loss inside ||d|| <= eps (per point); True where some iterate changed the label."""
    ws = [torch.from_numpy(w) for w in net.weights]
    bs = [torch.from_numpy(b.copy()) for b in net.biases]

    def f(z):
        for k, (w, b) in enumerate(zip(ws, bs)):
            z = z @ w.T + b
            if k < len(ws) - 1:
                z = torch.relu(z)
        return z

    gen = torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(x)
    y = torch.from_numpy(labels)
    radius = torch.from_numpy(eps)[:, None]
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(restarts):
        d = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        d = d / d.norm(dim=1, keepdim=True) * radius * torch.rand((len(x), 1), generator=gen, dtype=torch.float64)
        for _ in range(steps):
            d.requires_grad_(True)
            out = f(x0 + d)
            other = out.clone()
            other[torch.arange(len(x)), y] = -torch.inf
            loss = (other.max(dim=1).values - out[torch.arange(len(x)), y]).sum()
            (grad,) = torch.autograd.grad(loss, d)
            with torch.no_grad():
                g = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
                d = d + 2.5 * radius / steps * g
                norm = d.norm(dim=1, keepdim=True)
                d = d * torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)
                flipped |= f(x0 + d).argmax(dim=1) != y
    return flipped.numpy()


def boundary_distance_2d(net, x: np.ndarray, label: int, reach: float = 4.0, rays: int = 360) -> float:
    """Distance from x to the nearest input found with another label: a coarse scan along rays, refined by
    bisection. Every value is the distance of a real misclassified point, so it bounds the true one above."""
    angles = np.linspace(0, 2 * np.pi, rays, endpoint=False)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    ts = np.linspace(0, reach, 201)[1:]
    pts = x[None, None, :] + ts[None, :, None] * dirs[:, None, :]
    wrong = net.forward(pts.reshape(-1, 2)).argmax(axis=1).reshape(rays, -1) != label
    found = wrong.any(axis=1)
    if not found.any():
        return np.inf
    first = np.argmax(wrong[found], axis=1)
    hi = ts[first]
    lo = np.where(first > 0, ts[np.maximum(first - 1, 0)], 0.0)
    d = dirs[found]
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        bad = net.forward(x + mid[:, None] * d).argmax(axis=1) != label
        hi, lo = np.where(bad, mid, hi), np.where(bad, lo, mid)
    return float(hi.min())


@pytest.fixture(scope="module")
def blobs_certified(blobs):
    """The pair certificate (LipSDP-Neuron) and the boundary distance of each correctly classified point."""
    net, x, y = blobs
    cert = lipsdp.certify(net, x, y, method="neuron")
    dist = np.array([boundary_distance_2d(net, xi, yi) if ok else 0.0 for xi, yi, ok in zip(x, y, cert.correct)])
    return cert, dist


# -- pair bounds --------------------------------------------------------------------------------------


def test_pair_bounds_between_sampled_pair_jacobians_and_sqrt2_global():
    net = he_network([3, 10, 10, 4], seed=1, bias_scale=0.5)
    global_bound = lipsdp.estimate(net, "neuron").upper
    bounds = pair_bounds(net, method="neuron")
    assert sorted(bounds) == [(i, j) for i in range(4) for j in range(i + 1, 4)]
    pts = np.random.default_rng(1).standard_normal((2000, 3)) * 2
    for (i, j), res in bounds.items():
        sampled = jacobian_norms(pair_network(net, (i, j)), pts).max()
        assert sampled <= res.upper <= np.sqrt(2) * global_bound * (1 + 1e-6)
    # f_i - f_j and f_j - f_i have the same constant.
    assert lipsdp.estimate(net, "neuron", pair=(2, 0)).upper == pytest.approx(bounds[(0, 2)].upper, rel=1e-6)
    # A pair of a classifier whose two rows coincide has a zero difference.
    w_last = net.weights[-1].copy()
    w_last[1] = w_last[0]
    same = net.with_last_weight(w_last, net.biases[-1])
    assert lipsdp.estimate(same, "naive", pair=(0, 1)).upper == 0.0


def test_pair_bounds_in_parallel_match_serial():
    net = he_network([2, 6, 6, 3], seed=2)
    serial = pair_bounds(net, [(0, 1), (1, 2), (0, 2)], method="layer")
    parallel = pair_bounds(net, [(0, 1), (1, 2), (0, 2)], method="layer", workers=2)
    assert {p: r.upper for p, r in serial.items()} == pytest.approx({p: r.upper for p, r in parallel.items()})


def test_bad_pairs():
    net = he_network([2, 4, 3], seed=0)
    for pair in [(0, 0), (0, 3), (-1, 1), (1,)]:
        with pytest.raises(LipSDPError, match="pair"):
            lipsdp.estimate(net, "naive", pair=pair)


# -- certified radii -------------------------------------------------------------------------------------


def test_certified_radii_are_below_the_true_boundary_distance(blobs, blobs_certified):
    _, x, _ = blobs
    cert, dist = blobs_certified
    assert cert.radii.shape == (len(x),)
    assert 0.6 < cert.clean_accuracy < 1.0  # overlapping blobs: some test points are misclassified
    assert np.all(cert.radii[~cert.correct] == 0)
    assert np.all(cert.radii[cert.correct] > 0)
    assert np.all(cert.radii[cert.correct] <= dist[cert.correct])
    # Not vacuous (a global Lipschitz certificate is conservative: here about 1/8 of the way, typically).
    assert np.median(cert.radii[cert.correct] / dist[cert.correct]) > 0.05


def test_pgd_inside_the_certified_radius_never_changes_the_label(blobs, blobs_certified):
    net, x, y = blobs
    cert, dist = blobs_certified
    ok = cert.correct
    assert not pgd_flips(net, x[ok], y[ok], cert.radii[ok] * (1 - 1e-9)).any()
    # The same attack does work once the budget passes the decision boundary.
    assert pgd_flips(net, x[ok], y[ok], dist[ok] * 1.05).mean() > 0.5


def test_pair_radii_beat_global_radii(blobs, blobs_certified):
    net, x, y = blobs
    pair = blobs_certified[0]
    glob = lipsdp.certify(net, x, y, method="neuron", bound="global")
    lip = glob.bounds["global"]
    logits = net.forward(x)
    top = np.sort(logits, axis=1)
    expected = np.where(glob.correct, (top[:, -1] - top[:, -2]) / (np.sqrt(2) * lip), 0.0)
    np.testing.assert_allclose(glob.radii, expected, rtol=1e-12)
    assert np.all(pair.radii >= glob.radii * (1 - 1e-6))
    assert np.mean(pair.radii[pair.correct]) > np.mean(glob.radii[glob.correct])


def test_certified_accuracy(blobs):
    net, x, y = blobs
    cert = lipsdp.certify(net, x, y, method="layer")
    assert cert.certified_accuracy(0.0) == pytest.approx(cert.clean_accuracy)
    radii = np.linspace(0, 1.5, 16)
    acc = cert.certified_accuracy(radii)
    assert acc.shape == (16,) and np.all(np.diff(acc) <= 0)
    for r, a in zip(radii, acc):
        assert a == pytest.approx(np.mean(cert.correct & (cert.radii >= r)))
    assert cert.certified_accuracy(1e9) == 0.0


def test_digits_classifier_pgd_and_certificates():
    """sklearn digits (8x8 = 64 inputs, 10 classes): every class pair bounded (sequential method)."""
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x, y = data.data / 16.0, data.target
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))
    train(model, x[:1200], y[:1200], steps=200, seed=3)
    net = load_network(model)
    xt, yt = x[1200:1400], y[1200:1400]
    cert = lipsdp.certify(model, xt, yt, method="sequential")
    assert cert.clean_accuracy > 0.85
    assert len(cert.bounds) == 45
    ok = cert.correct & (cert.radii > 0)
    assert ok.sum() > 100
    assert not pgd_flips(net, xt[ok], yt[ok], cert.radii[ok] * (1 - 1e-9)).any()


def test_certify_input_errors(blobs):
    net, x, y = blobs
    with pytest.raises(LipSDPError, match="bound"):
        lipsdp.certify(net, x, y, bound="local")
    with pytest.raises(LipSDPError, match="labels"):
        lipsdp.certify(net, x, y + 5)
    with pytest.raises(LipSDPError, match="network takes 2"):
        lipsdp.certify(net, np.zeros((3, 5)), np.zeros(3, dtype=int))
    with pytest.raises(LipSDPError, match="3 inputs but y has 2"):
        lipsdp.certify(net, np.zeros((3, 2)), np.zeros(2, dtype=int))


def test_cli_certify(tmp_path, blobs):
    from typer.testing import CliRunner

    from lipsdp.cli import app
    from lipsdp.io.arrays import save_npz

    net, x, y = blobs
    save_npz(net, tmp_path / "clf.npz")
    np.savez(tmp_path / "data.npz", x=x[:20], y=y[:20])
    runner = CliRunner()
    out = runner.invoke(app, ["certify", str(tmp_path / "clf.npz"), str(tmp_path / "data.npz"), "--method", "layer",
                              "--json", "--radii", "0.1", "0.3"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    cert = lipsdp.certify(net, x[:20], y[:20], method="layer")
    np.testing.assert_allclose(data["radii"], cert.radii, rtol=1e-9)
    assert data["certified_accuracy"] == pytest.approx({"0.1": cert.certified_accuracy(0.1),
                                                        "0.3": cert.certified_accuracy(0.3)})
    table = runner.invoke(app, ["certify", str(tmp_path / "clf.npz"), str(tmp_path / "data.npz"), "-m", "layer",
                                "--bound", "global"])
    assert table.exit_code == 0, table.output
    assert "certified accuracy" in " ".join(table.output.split())  # the title may wrap in a narrow terminal
    assert f"{cert.certified_accuracy(0.0):.4f}" in table.output
    bad = runner.invoke(app, ["certify", str(tmp_path / "clf.npz"), str(tmp_path / "clf.npz")])
    assert bad.exit_code == 2
