"""Train a small CNN on sklearn's 8x8 digits, export it to ONNX, and certify it.

    python examples/certify_digits_cnn.py

Prints the Lipschitz bound of the whole network (LipSDP on the unrolled convolution), the class-pair
bounds, and the certified accuracy at a few l2 radii; then a local bound on a small ball around one image.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import lipsdp


def main() -> None:
    data = load_digits()
    x = (data.data / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    y = data.target
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
        nn.Linear(16, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x[:1400]), torch.from_numpy(y[:1400])
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()

    path = Path(tempfile.mkdtemp()) / "digits_cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 1, 8, 8), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    print(f"network from ONNX: {lipsdp.load_network(path).describe()}")
    whole = lipsdp.estimate(path, "sequential")
    print(f"global bound (sequential): {whole.upper:.4f}")

    test_x, test_y = x[1400:1600], y[1400:1600]
    for bound in ("global", "pair"):
        cert = lipsdp.certify(path, test_x, test_y, method="sequential", bound=bound)
        radii = [0.0, 0.1, 0.2, 0.3]
        accs = ", ".join(f"r={r:g}: {a:.3f}" for r, a in zip(radii, cert.certified_accuracy(radii)))
        print(f"certified accuracy ({bound} bounds): {accs}")

    ball = lipsdp.Ball(test_x[0].reshape(-1), 0.1)
    local = lipsdp.estimate(path, "sequential", region=ball, lower=True, lower_samples=128, lower_steps=20)
    print(f"local bound on a ball of radius 0.1: {local.upper:.4f} (lower {local.lower:.4f}); {local.notes[0]}")


if __name__ == "__main__":
    main()
