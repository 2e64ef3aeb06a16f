"""NNet files (the ACAS Xu format of K. Julian, Stanford) -> Network.

Layout (text, comma-separated, trailing commas allowed):
  header lines starting with //
  numLayers, inputSize, outputSize, maxLayerSize
  numLayers + 1 layer sizes (input first)
  a deprecated flag line (ignored)
  input minimums, input maximums (inputSize values each; some files carry extra trailing values)
  means, ranges: inputSize values for the inputs, and the LAST value of the line for the output
  then per layer: its weight matrix row by row (layer size lines of previous-size values), then its
  biases (one per line). Hidden layers use ReLU, the output layer is affine.

An NNet network evaluates y = range_out * f_n((clip(x) - mean_in) / range_in) + mean_out, with clip to
[min_in, max_in]. The file's weights describe f_n, the network on normalised inputs and outputs; that is
what `load_nnet` returns by default (what verification tools and the converted .npz files use). With
`units="raw"` the input scaling is folded into the first weight matrix and the output scaling into the
last layer, so the Lipschitz bound is in the units of x and y: L_raw = range_out * Lip(f_n o diag(1/range_in)).
Clipping is 1-Lipschitz, so leaving it out gives a valid (never smaller) bound; `forward` of the raw
network equals the NNet evaluation for inputs inside [min_in, max_in] (outside, apply
`normalization.clip` first).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from lipsdp.errors import ModelLoadError
from lipsdp.network import Network

MAX_BYTES = 1 << 30  # a 1 GiB text file is far beyond any NNet network
_UNITS = ("normalized", "raw")


@dataclass(frozen=True)
class NNetNormalization:
    """The input/output normalisation recorded in an NNet file.

    x_n = (clip(x, input_min, input_max) - input_mean) / input_range;  y = output_range * y_n + output_mean
    """

    input_min: np.ndarray
    input_max: np.ndarray
    input_mean: np.ndarray
    input_range: np.ndarray
    output_mean: float
    output_range: float

    def clip(self, x: np.ndarray) -> np.ndarray:
        """Inputs clipped to the box the network was trained on (what NNet evaluation does first)."""
        return np.clip(np.asarray(x, dtype=np.float64), self.input_min, self.input_max)

    def normalize_input(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs -> the normalised inputs of the network proper (clipping included)."""
        return (self.clip(x) - self.input_mean) / self.input_range

    def denormalize_output(self, y: np.ndarray) -> np.ndarray:
        """Normalised outputs -> raw units."""
        return self.output_range * np.asarray(y, dtype=np.float64) + self.output_mean


@dataclass(frozen=True)
class NNetNetwork(Network):
    """A Network read from an NNet file, with the file's normalisation kept beside it.

    `units` says what the weights act on: 'normalized' (the file's weights, the default) or 'raw' (input
    and output scaling folded in). `normalization` is the same in both cases.
    """

    normalization: NNetNormalization | None = field(default=None, repr=False, compare=False)
    units: str = "normalized"

    def raw_forward(self, x: np.ndarray) -> np.ndarray:
        """The NNet evaluation in raw units, clipping included: y = range_out f_n(x_n) + mean_out."""
        if self.normalization is None:
            return self.forward(x)
        if self.units == "raw":
            return self.forward(self.normalization.clip(x))
        return self.normalization.denormalize_output(self.forward(self.normalization.normalize_input(x)))


def _numbers(line: str, where: str, lineno: int) -> list[float]:
    parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_float(p))
        raise ModelLoadError(f"{where}: line {lineno}: '{bad[:40]}' is not a number") from None
    if not all(np.isfinite(values)):
        raise ModelLoadError(f"{where}: line {lineno}: contains NaN or infinite values")
    return values


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_nnet(path: str | Path) -> NNetNetwork:
    """Parse an NNet file into the network on normalised inputs/outputs, with its normalisation.

    Raises ModelLoadError naming the file and line for anything that does not follow the format.
    """
    path = Path(path)
    where = str(path)
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size > MAX_BYTES:
                raise ModelLoadError(f"{where}: larger than 1 GiB; not an NNet file lipsdp reads")
            raw = fh.read()
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot read the file ({exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelLoadError(f"{where}: not a text NNet file (it is not UTF-8)") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines())]
    body = [(n, line) for n, line in lines if line.strip() and not line.lstrip().startswith("//")]
    if len(body) < 7:
        raise ModelLoadError(
            f"{where}: too short for an NNet file (needs the size line, layer sizes, flag, min, max, mean and "
            "range lines, then the weights)"
        )

    def row(index: int, what: str) -> list[float]:
        n, line = body[index]
        values = _numbers(line, where, n)
        if not values:
            raise ModelLoadError(f"{where}: line {n}: expected the {what}")
        return values

    head = row(0, "sizes numLayers, inputSize, outputSize, maxLayerSize")
    if len(head) < 3 or any(v != int(v) or v < 1 for v in head[:3]):
        raise ModelLoadError(
            f"{where}: line {body[0][0]}: expected positive integers numLayers, inputSize, outputSize, "
            f"maxLayerSize; got {head}"
        )
    n_layers, n_in, n_out = (int(v) for v in head[:3])
    sizes_row = row(1, "layer sizes")
    if len(sizes_row) < n_layers + 1 or any(v != int(v) or v < 1 for v in sizes_row[: n_layers + 1]):
        raise ModelLoadError(
            f"{where}: line {body[1][0]}: expected {n_layers + 1} positive integer layer sizes; got {sizes_row}"
        )
    sizes = [int(v) for v in sizes_row[: n_layers + 1]]
    if sizes[0] != n_in or sizes[-1] != n_out:
        raise ModelLoadError(
            f"{where}: the layer sizes {sizes} do not start with inputSize {n_in} and end with outputSize {n_out}"
        )
    # body[2] is the deprecated symmetric flag.
    mins, maxs, means, ranges = (row(i, name) for i, name in ((3, "input minimums"), (4, "input maximums"),
                                                             (5, "means"), (6, "ranges")))
    for values, name, need, index in ((mins, "minimums", n_in, 3), (maxs, "maximums", n_in, 4),
                                      (means, "means", n_in + 1, 5), (ranges, "ranges", n_in + 1, 6)):
        if len(values) < need:
            raise ModelLoadError(
                f"{where}: line {body[index][0]}: {len(values)} {name}, need at least {need} "
                f"({n_in} inputs{' + 1 output' if need > n_in else ''})"
            )
    input_range = np.array(ranges[:n_in])
    if np.any(input_range <= 0) or ranges[-1] <= 0:
        raise ModelLoadError(f"{where}: line {body[6][0]}: the ranges must be positive, got {ranges}")
    norm = NNetNormalization(
        input_min=np.array(mins[:n_in]),
        input_max=np.array(maxs[:n_in]),
        input_mean=np.array(means[:n_in]),
        input_range=input_range,
        output_mean=float(means[-1]),
        output_range=float(ranges[-1]),
    )
    if np.any(norm.input_min > norm.input_max):
        raise ModelLoadError(f"{where}: an input minimum exceeds its maximum (lines {body[3][0]}, {body[4][0]})")
    values: list[float] = []
    starts: list[int] = []  # line number where each value came from, for error messages
    for n, line in body[7:]:
        parsed = _numbers(line, where, n)
        values.extend(parsed)
        starts.extend([n] * len(parsed))
    need = sum(a * b + b for a, b in pairwise(sizes))
    if len(values) != need:
        raise ModelLoadError(
            f"{where}: the layer sizes {sizes} need {need} weights and biases, but the file has {len(values)}"
        )
    flat = np.array(values)
    weights, biases, pos = [], [], 0
    for a, b in pairwise(sizes):
        weights.append(flat[pos : pos + a * b].reshape(b, a))
        pos += a * b
        biases.append(flat[pos : pos + b])
        pos += b
    net = NNetNetwork.from_arrays(weights, "relu", biases)
    return replace(net, normalization=norm, units="normalized")


def to_raw_units(net: NNetNetwork) -> NNetNetwork:
    """The same network acting on raw inputs and giving raw outputs (clipping left out: 1-Lipschitz).

    W_0 <- W_0 diag(1 / range_in), b_0 <- b_0 - W_0 (mean_in / range_in); W_l <- range_out W_l,
    b_l <- range_out b_l + mean_out. Exact up to the rounding of these products.
    """
    if net.units == "raw":
        return net
    norm = net.normalization
    if norm is None:
        raise ModelLoadError("this network carries no NNet normalisation to convert to raw units")
    ws, bs = list(net.weights), list(net.biases)
    w0 = ws[0]
    bs[0] = bs[0] - w0 @ (norm.input_mean / norm.input_range)
    ws[0] = w0 / norm.input_range[None, :]
    ws[-1] = norm.output_range * ws[-1]
    bs[-1] = norm.output_range * bs[-1] + norm.output_mean
    raw = NNetNetwork.from_arrays(ws, list(net.activations), bs)
    return replace(raw, alphas=net.alphas, betas=net.betas, normalization=norm, units="raw")


def load_nnet(path: str | Path, *, nnet_units: str = "normalized", **_: Any) -> NNetNetwork:
    """Read an NNet file: the network on normalised inputs/outputs (`nnet_units='normalized'`, default),
    or with the normalisation folded in so bounds are in raw units (`nnet_units='raw'`).

    The normalisation is kept on the result as `.normalization` either way.
    """
    units = str(nnet_units).lower().replace("normalised", "normalized")
    if units not in _UNITS:
        raise ModelLoadError(f"nnet_units must be 'normalized' or 'raw', got {nnet_units!r}")
    net = read_nnet(path)
    return to_raw_units(net) if units == "raw" else net
