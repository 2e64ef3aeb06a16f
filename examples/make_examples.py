"""Regenerate the bundled example networks (deterministic). Run: python examples/make_examples.py"""

from itertools import pairwise
from pathlib import Path

import numpy as np

from lipsdp.io.arrays import load_mat, save_mat, save_npz
from lipsdp.network import Network

HERE = Path(__file__).parent


def main() -> None:
    # 1. The original LipSDP random ReLU net [2, 10, 30, 20, 2] (MIT, see LICENSE-original-lipsdp).
    relu = load_mat(HERE / "random_weights.mat")
    save_npz(relu, HERE / "relu_2-10-30-20-2.npz")
    save_mat(relu, HERE / "relu_2-10-30-20-2.mat")
    # 2. The original LipSDP MNIST classifier 784-50-10.
    mnist = load_mat(HERE / "mnist_weights.mat")
    save_npz(mnist, HERE / "mnist_784-50-10.npz")
    save_mat(mnist, HERE / "mnist_784-50-10.mat")
    # 3. A small tanh controller: state (4) -> 16 -> 16 -> action (1), seeded Glorot-style weights.
    rng = np.random.default_rng(2019)
    sizes = [4, 16, 16, 1]
    weights = [rng.normal(0, np.sqrt(2.0 / (a + b)), size=(b, a)) for a, b in pairwise(sizes)]
    biases = [rng.normal(0, 0.1, size=b) for b in sizes[1:]]
    controller = Network.from_arrays(weights, "tanh", biases)
    save_npz(controller, HERE / "tanh_controller.npz")
    save_mat(controller, HERE / "tanh_controller.mat")


if __name__ == "__main__":
    main()
