"""Write seeded random CIFAR-10 CNNs shaped like VNN-COMP 2021's cifar2020 nets, whose trained weights are
not shared here: COLT's cifar10_2_255 and cifar10_8_255 and ERAN's ConvBig (layer shapes from their
published architectures; weights torch's default initialisation, seed 0 for each).

    python benchmarks/cifar_shapes.py OUT_DIR
    python benchmarks/cnn.py --cnn OUT_DIR --nets colt2 colt8 convbig --tiers naive sequential

Their widest layers (32768 neurons) are what `lipsdp.reduced` eliminates from the LMI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


def _colt2() -> nn.Module:  # 3072 -> 32768 -> 8192 -> 8192 -> 250 -> 10
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(32, 128, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8192, 250), nn.ReLU(), nn.Linear(250, 10),
    )


def _colt8() -> nn.Module:  # 3072 -> 8192 -> 8192 -> 250 -> 10
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 128, 4, 2, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8192, 250), nn.ReLU(), nn.Linear(250, 10),
    )


def _convbig() -> nn.Module:  # 3072 -> 32768 -> 8192 -> 16384 -> 4096 -> 512 -> 512 -> 10
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4096, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10),
    )


SHAPES = {"colt2": _colt2, "colt8": _colt8, "convbig": _convbig}


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "cifar_shapes")
    out.mkdir(parents=True, exist_ok=True)
    for name, build in SHAPES.items():
        torch.manual_seed(0)  # each net on its own seed: one can be made without the others
        torch.onnx.export(build().eval(), torch.zeros(1, 3, 32, 32), out / f"{name}.onnx", dynamo=False)
        print(out / f"{name}.onnx")


if __name__ == "__main__":
    main()
