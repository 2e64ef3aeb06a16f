"""Weight files: `.npz` (W0, W1, ..., optional b0, ..., optional `activations`) and the original LipSDP
`.mat` format (a cell array named `weights`, entries (n_out, n_in), ReLU, no biases)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from lipsdp.errors import LipSDPError, ModelLoadError
from lipsdp.network import Network


def _numbered(keys: list[str], prefix: str) -> list[str]:
    found = sorted((int(m.group(1)), k) for k in keys if (m := re.fullmatch(prefix + r"(\d+)", k)))
    indices = [i for i, _ in found]
    if indices and indices != list(range(len(indices))):
        raise ModelLoadError(f"arrays {prefix}0, {prefix}1, ... must be numbered without gaps; found {indices}")
    return [k for _, k in found]


def _build(source: str, weights: list[np.ndarray], biases, activations) -> Network:
    try:
        return Network.from_arrays(weights, activations, biases)
    except LipSDPError as exc:
        raise type(exc)(f"{source}: {exc}") from None


def load_npz(path: str | Path) -> Network:
    """Read a `.npz` weight file. Never unpickles: object arrays are refused."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelLoadError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ModelLoadError(f"{path}: holds a single array, not a .npz archive of W0, W1, ...")
    with data:
        try:
            keys = list(data.keys())
            wkeys = _numbered(keys, "W")
            if not wkeys:
                raise ModelLoadError(f"{path}: no weight arrays W0, W1, ... found (arrays present: {keys})")
            weights = [data[k] for k in wkeys]
            bkeys = _numbered(keys, "b")
            biases = None
            if bkeys:
                if len(bkeys) != len(wkeys):
                    raise ModelLoadError(f"{path}: {len(wkeys)} weight arrays but {len(bkeys)} bias arrays")
                biases = [data[k] for k in bkeys]
            activations = "relu"
            if "activations" in keys:
                acts = data["activations"]
                activations = [str(a) for a in np.atleast_1d(acts)]
                if len(activations) == 1 and len(weights) > 2:
                    activations = activations[0]
        except ValueError as exc:  # e.g. object arrays that would need pickle
            raise ModelLoadError(f"{path}: unreadable array ({exc}); store plain numeric arrays") from None
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ModelLoadError(f"{path}: corrupt .npz archive ({exc})") from None
    return _build(str(path), weights, biases, activations)


def load_mat(path: str | Path) -> Network:
    """Read an original-LipSDP `.mat` file (cell array `weights`; optional `biases`, `activations`)."""
    import scipy.io

    path = Path(path)
    try:
        data = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError, EOFError, Exception) as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from None
    if "weights" not in data:
        names = [k for k in data if not k.startswith("__")]
        raise ModelLoadError(f"{path}: no cell array named 'weights' (variables present: {names})")

    def cells(value) -> list[np.ndarray]:
        arr = np.asarray(value)
        if arr.dtype == object:
            return [np.asarray(c) for c in arr.reshape(-1, order="F")]
        return [arr]

    weights = cells(data["weights"])
    biases = [np.asarray(b).reshape(-1) for b in cells(data["biases"])] if "biases" in data else None
    activations = "relu"
    if "activations" in data:
        acts = [str(np.asarray(a).reshape(-1)[0]) for a in cells(data["activations"])]
        activations = acts[0] if len(acts) == 1 else acts
    return _build(str(path), weights, biases, activations)


def save_npz(net: Network, path: str | Path) -> None:
    """Write a network as `.npz` (W_k, b_k, activations) that `load_npz` reads back exactly."""
    arrays = {f"W{k}": w for k, w in enumerate(net.weights)}
    arrays.update({f"b{k}": b for k, b in enumerate(net.biases)})
    arrays["activations"] = np.array([a.label().replace("(", ":").rstrip(")") for a in net.activations], dtype=str)
    np.savez(path, **arrays)


def save_mat(net: Network, path: str | Path) -> None:
    """Write a network in the original LipSDP `.mat` layout (plus biases and activation names)."""
    import scipy.io

    cell = np.empty((1, len(net.weights)), dtype=object)
    bias = np.empty((1, len(net.weights)), dtype=object)
    for k, (w, b) in enumerate(zip(net.weights, net.biases)):
        cell[0, k] = w
        bias[0, k] = b.reshape(-1, 1)
    acts = np.empty((1, max(net.depth, 1)), dtype=object)
    for k in range(net.depth):
        acts[0, k] = net.activations[k].label().replace("(", ":").rstrip(")")
    data = {"weights": cell, "biases": bias}
    if net.depth:
        data["activations"] = acts
    scipy.io.savemat(path, data)
