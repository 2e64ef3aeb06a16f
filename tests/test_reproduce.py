"""`lipsdp reproduce --quick` end to end, and the pieces it rests on (attacks, seeded training).

The orderings checked are mathematical facts, not recorded numbers: lower <= neuron <= layer <= naive for
every network; certified accuracy <= accuracy left by an attack <= clean accuracy at every radius.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
torch = pytest.importorskip("torch")

from typer.testing import CliRunner

from lipsdp.cli import app
from lipsdp.training import accuracy, attacked_accuracy, fgsm, mlp, pgd, train_classifier

REL = 1e-7


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `lipsdp reproduce --quick` run through the CLI (about 15 s on 2 cores)."""
    root = tmp_path_factory.mktemp("reproduce")
    result = CliRunner().invoke(
        app, ["reproduce", "--out", str(root / "report"), "--quick", "--copy-figures", str(root / "docs")]
    )
    assert result.exit_code == 0, result.output
    return root, json.loads((root / "report" / "results.json").read_text())


def test_report_and_figures_written(quick_run):
    root, data = quick_run
    report = (root / "report" / "REPORT.md").read_text()
    for heading in ("## 1. Random networks", "## 2. Trained classifier: iris", "## 3. Certified robustness"):
        assert heading in report
    figures = sorted((root / "report" / "figures").glob("*.png"))
    names = {p.name for p in figures}
    assert {"random_depth.png", "random_width.png", "random_time.png", "trained_iris.png"} <= names
    assert any(n.startswith("robust_iris") for n in names)
    for p in figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{p.name}" in report
        assert (root / "docs" / p.name).read_bytes() == p.read_bytes()
    assert all(c["passed"] for c in data["checks"])


def test_bound_orderings(quick_run):
    _, data = quick_run
    nets: dict[tuple, dict[str, float]] = {}
    for r in data["random"]:
        if r["value"] is not None:
            nets.setdefault((r["sweep"], r["hidden_layers"], r["width"], r["seed"]), {})[r["method"]] = r["value"]
    for t in data["trained"]:
        nets[(t["dataset"], t["training"], t["eps"])] = {k: v for k, v in t["bounds"].items() if v is not None}
    assert len(nets) >= 8
    for key, b in nets.items():
        assert {"lower", "neuron", "layer", "naive"} <= set(b), key
        assert b["lower"] <= b["neuron"] * (1 + REL), key
        assert b["neuron"] <= b["layer"] * (1 + REL), key
        assert b["layer"] <= b["naive"] * (1 + REL), key
        assert b["lower"] > 0


def test_certified_below_attacked_below_clean(quick_run):
    _, data = quick_run
    assert {r["dataset"] for r in data["robustness"]} == {"iris", "digits"}
    for rb in data["robustness"]:
        curves = rb["curves"]
        clean, attacked = np.array(curves["clean"]), np.array(curves["pgd attack"])
        certified = {k: np.array(v) for k, v in curves.items() if k not in ("clean", "pgd attack")}
        assert any(k.startswith("global") for k in certified) and any(k.startswith("pair") for k in certified)
        assert np.all(attacked <= clean + 1e-12)
        for name, c in certified.items():
            assert np.all(c <= attacked + 1e-12), (rb["model"], name)
            assert np.all(np.diff(c) <= 1e-12), name  # certified accuracy cannot grow with the radius
            assert c[0] == pytest.approx(clean[0])  # radius 0: every correct point is certified
        local = next(v for k, v in certified.items() if k.startswith("local"))
        pair = next(v for k, v in certified.items() if k.startswith("pair"))
        assert np.all(local >= pair - 1e-12)  # local bounds only ever add certificates


def test_adversarial_training_lowers_the_bound_on_digits(quick_run):
    """The paper's qualitative claim on the quick digits model (a property of these seeded runs)."""
    _, data = quick_run
    digits = {t["training"]: t["bounds"]["neuron"] for t in data["trained"] if t["dataset"] == "digits"}
    assert digits["pgd"] < digits["standard"]


# -- the pieces ---------------------------------------------------------------------------------
def _toy_model(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return mlp([5, 12, 3])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_attacks_stay_in_the_ball(norm):
    model = _toy_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    eps = 0.3
    x_adv, fooled = pgd(model, x, y, eps, norm, steps=15, generator=gen)
    d = x_adv - x
    size = d.norm(dim=1) if norm == "l2" else d.abs().amax(dim=1)
    assert torch.all(size <= eps * (1 + 1e-12))
    with torch.no_grad():
        assert torch.all(fooled >= (model(x_adv).argmax(1) != y))  # 'fooled' includes the last iterate
    x_f = fgsm(model, x, y, eps, norm)
    size_f = (x_f - x).norm(dim=1) if norm == "l2" else (x_f - x).abs().amax(dim=1)
    assert torch.allclose(size_f, torch.full_like(size_f, eps))


def test_pgd_finds_the_exact_boundary_of_a_linear_classifier():
    """Two-class linear model: the l2 distance to the boundary is |margin| / ||w_0 - w_1||, exactly."""
    model = mlp([3, 2])
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
        model[0].bias.zero_()
    x = np.array([[1.0, 1.0, 0.5]])  # logits (2.5, 0.5): margin 2, ||w0 - w1|| = sqrt(1 + 4 + 4) = 3
    dist = 2.0 / 3.0
    assert attacked_accuracy(model, x, [0], dist * 0.98, "l2", steps=40) == 1.0
    assert attacked_accuracy(model, x, [0], dist * 1.02, "l2", steps=40) == 0.0


def test_training_is_deterministic_and_learns():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    a = train_classifier(x, y, [8], epochs=30, seed=3, attack="pgd", eps=0.1, pgd_steps=2)
    b = train_classifier(x, y, [8], epochs=30, seed=3, attack="pgd", eps=0.1, pgd_steps=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert accuracy(a, x, y) > 0.9
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before  # restored


def test_mnist_file_is_read_and_bad_files_are_refused(tmp_path):
    from lipsdp.errors import LipSDPError
    from lipsdp.reproduce import load_dataset

    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 50),
             x_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 20))
    ds = load_dataset("mnist", mnist=path)
    assert ds.x_train.shape == (50, 784) and ds.x_test.shape == (20, 784)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    with pytest.raises(LipSDPError, match="x_train"):
        load_dataset("mnist", mnist=tmp_path / "bad.npz")
    with pytest.raises(LipSDPError, match="--mnist"):
        load_dataset("mnist")
