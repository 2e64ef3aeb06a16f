"""Weight files: `.npz` (W0, W1, ..., optional b0, ..., optional `activations`, optional `passthrough{k}`:
the indices of hidden layer k's pass-through (identity) neurons, see `lipsdp.activations.Mixed`) and the
original LipSDP `.mat` format (a cell array named `weights`, entries (n_out, n_in), ReLU, no biases; v7.3
files via `lipsdp.io.mat73`)."""

from __future__ import annotations

import re
import tokenize
import zipfile
from pathlib import Path

import numpy as np

from lipsdp.activations import Mixed, Reflect
from lipsdp.errors import LipSDPError, ModelLoadError
from lipsdp.network import Network
from lipsdp.weights import dense


def _numbered(keys: list[str], prefix: str, source: str = "weight file") -> list[str]:
    found = sorted((int(m.group(1)), k) for k in keys if (m := re.fullmatch(prefix + r"(\d+)", k)))
    indices = [i for i, _ in found]
    if indices and indices != list(range(len(indices))):
        raise ModelLoadError(f"{source}: arrays {prefix}0, {prefix}1, ... must be numbered without gaps; found {indices}")
    return [k for _, k in found]


from lipsdp.io.chain import MAX_ARRAY_ELEMENTS, named_activations
from lipsdp.io.chain import build_from_arrays as _build


def _check_npz_headers(path: Path) -> None:
    """Read every member's .npy header (shape only, no data) and refuse absurd sizes before allocating."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }.get(version)
                    if read_header is None:  # (3, 0) and later: leave the checks to np.load
                        continue
                    shape = read_header(fh)[0]
                n = int(np.prod(shape, dtype=object)) if shape else 1
                if n > MAX_ARRAY_ELEMENTS:
                    raise ModelLoadError(
                        f"{path}: array {info.filename[:-4]} claims shape {tuple(shape)} ({n:.3g} elements), beyond "
                        f"the {MAX_ARRAY_ELEMENTS:.3g} lipsdp accepts; the file is corrupt or not a weight file"
                    )
    except (
        zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, NotImplementedError, SyntaxError,
        tokenize.TokenError,  # numpy tokenizes the header text; a corrupt header can raise this
    ) as exc:
        raise ModelLoadError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


def load_npz(path: str | Path, activation: str | None = None) -> Network:
    """Read a `.npz` weight file. Never unpickles: object arrays are refused. `activation` names the hidden
    activation when the file does not (e.g. 'maxmin', 'groupsort:4'); default relu."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        _check_npz_headers(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelLoadError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ModelLoadError(f"{path}: holds a single array, not a .npz archive of W0, W1, ...")
    with data:
        try:
            keys = list(data.keys())
            wkeys = _numbered(keys, "W", str(path))
            if not wkeys:
                raise ModelLoadError(f"{path}: no weight arrays W0, W1, ... found (arrays present: {keys})")
            weights = [data[k] for k in wkeys]
            bkeys = _numbered(keys, "b", str(path))
            biases = None
            if bkeys:
                if len(bkeys) != len(wkeys):
                    raise ModelLoadError(f"{path}: {len(wkeys)} weight arrays but {len(bkeys)} bias arrays")
                biases = [data[k] for k in bkeys]
            activations = None
            if "activations" in keys:
                acts = data["activations"]
                activations = [str(a) for a in np.atleast_1d(acts)]
                if len(activations) == 1 and len(weights) > 2:
                    activations = activations[0]
            activations = named_activations(str(path), activations, activation) or "relu"
            passthrough = {int(m.group(1)): data[k] for k in keys if (m := re.fullmatch(r"passthrough(\d+)", k))}
            flips = {int(m.group(1)): data[k] for k in keys if (m := re.fullmatch(r"flip(\d+)", k))}
            if flips or "reflect" in ([activations] if isinstance(activations, str) else list(activations)):
                activations = _with_flips(str(path), activations, flips, passthrough, weights)
                passthrough = {k: v for k, v in passthrough.items()
                               if not (0 <= k < len(activations) and isinstance(activations[k], Reflect))}
            if passthrough:
                activations = _with_passthrough(str(path), activations, passthrough, weights)
        except ValueError as exc:  # e.g. object arrays that would need pickle
            raise ModelLoadError(f"{path}: unreadable array ({exc}); store plain numeric arrays") from None
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ModelLoadError(f"{path}: corrupt .npz archive ({exc})") from None
    return _build(str(path), weights, biases, activations)


def _with_flips(source: str, activations, flips: dict[int, np.ndarray], passthrough: dict[int, np.ndarray],
                weights) -> list:
    """Hidden layers k named 'reflect' (a lowered norm-preserving layer): their |.| neurons `flip{k}` and
    pass-through neurons `passthrough{k}`."""
    from lipsdp.activations import reflect

    hidden = len(weights) - 1
    names = [activations] * hidden if isinstance(activations, str) else list(activations)
    if len(names) != hidden:
        return names  # Network.from_arrays reports the count
    for k in sorted(set(flips) | {j for j in passthrough if 0 <= j < hidden and names[j] == "reflect"}):
        if not 0 <= k < hidden or names[k] != "reflect":
            raise ModelLoadError(f"{source}: flip{k} belongs to a hidden layer named 'reflect'")
        arrays = [np.asarray(flips.get(k, np.zeros(0, dtype=np.int64))), np.asarray(passthrough.get(k, np.zeros(0, dtype=np.int64)))]
        if any(not np.issubdtype(a.dtype, np.integer) or a.ndim != 1 for a in arrays):
            raise ModelLoadError(f"{source}: flip{k} and passthrough{k} must be 1-D arrays of neuron indices")
        try:
            names[k] = reflect(arrays[0], int(np.asarray(weights[k]).shape[0]), arrays[1])
        except LipSDPError as exc:
            raise type(exc)(f"{source}: flip{k}: {exc}") from None
    if "reflect" in names:
        raise ModelLoadError(f"{source}: a hidden layer named 'reflect' needs its array flip{names.index('reflect')}")
    return names


def _with_passthrough(source: str, activations, passthrough: dict[int, np.ndarray], weights) -> list:
    """Hidden layers k with an array `passthrough{k}` (neuron indices) mix their activation with the identity."""
    from lipsdp.activations import activation, mixed

    hidden = len(weights) - 1
    names = [activations] * hidden if isinstance(activations, str) else list(activations)
    if len(names) != hidden:
        return names  # Network.from_arrays reports the count
    out = []
    for k, name in enumerate(names):
        if k not in passthrough:
            out.append(name)
            continue
        idx = np.asarray(passthrough[k])
        if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise ModelLoadError(f"{source}: passthrough{k} must be a 1-D array of neuron indices")
        try:
            out.append(mixed(activation(name), idx, int(np.asarray(weights[k]).shape[0])))
        except LipSDPError as exc:
            raise type(exc)(f"{source}: passthrough{k}: {exc}") from None
    extra = sorted(set(passthrough) - set(range(hidden)))
    if extra:
        raise ModelLoadError(f"{source}: passthrough{extra[0]} names no hidden layer (the net has {hidden})")
    return out


def load_mat(path: str | Path, activation: str | None = None) -> Network:
    """Read an original-LipSDP `.mat` file (cell array `weights`, or `W` as in Pauli et al.'s MaxMin nets;
    optional `biases`, `activations`). `activation` names the hidden activation when the file does not.

    MATLAB v7.3 (HDF5) files go to `lipsdp.io.mat73`; older versions to scipy.io.loadmat."""
    import scipy.io

    from lipsdp.io.mat73 import is_mat73, load_mat73

    path = Path(path)
    try:
        if is_mat73(path):
            return load_mat73(path, activation=activation)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({exc})") from None
    try:  # shapes from the headers only, so a file claiming a huge array is refused before allocating
        for name, shape, _ in scipy.io.whosmat(path):
            n = int(np.prod(shape, dtype=object)) if shape else 1
            if n > MAX_ARRAY_ELEMENTS:
                raise ModelLoadError(f"{path}: variable '{name}' claims shape {tuple(shape)}, beyond what lipsdp accepts")
    except ModelLoadError:
        raise
    except Exception:  # noqa: BLE001, S110 - unreadable headers are reported by loadmat below
        pass
    try:
        data = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, NotImplementedError, EOFError, Exception) as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from None
    key = "weights" if "weights" in data else "W" if "W" in data else None
    if key is None:
        names = [k for k in data if not k.startswith("__")]
        raise ModelLoadError(f"{path}: no cell array named 'weights' or 'W' (variables present: {names})")

    def cells(value) -> list[np.ndarray]:
        arr = np.asarray(value)
        if arr.dtype == object:
            return [np.asarray(c) for c in arr.reshape(-1, order="F")]
        return [arr]

    weights = cells(data[key])
    biases = [np.asarray(b).reshape(-1) for b in cells(data["biases"])] if "biases" in data else None
    activations = None
    if "activations" in data:
        acts = [str(np.asarray(a).reshape(-1)[0]) for a in cells(data["activations"])]
        activations = acts[0] if len(acts) == 1 else acts
    return _build(str(path), weights, biases, named_activations(str(path), activations, activation) or "relu")


def save_npz(net: Network, path: str | Path) -> None:
    """Write a network as `.npz` (W_k, b_k, activations) that `load_npz` reads back exactly."""
    arrays = {f"W{k}": dense(w) for k, w in enumerate(net.weights)}
    arrays.update({f"b{k}": b for k, b in enumerate(net.biases)})
    labels = []
    for k, act in enumerate(net.activations):
        if isinstance(act, Mixed):  # the base activation's name, and the pass-through neurons beside it
            arrays[f"passthrough{k}"] = np.array(act.identity, dtype=np.int64)
            act = act.base
        elif isinstance(act, Reflect):  # 'reflect', which neurons apply |.|, which pass their value through
            arrays[f"flip{k}"] = np.array(act.flip, dtype=np.int64)
            if act.identity:
                arrays[f"passthrough{k}"] = np.array(act.identity, dtype=np.int64)
        labels.append(act.label().replace("(", ":").rstrip(")"))
    arrays["activations"] = np.array(labels, dtype=str)
    np.savez(path, **arrays)


def save_mat(net: Network, path: str | Path) -> None:
    """Write a network in the original LipSDP `.mat` layout (plus biases and activation names)."""
    import scipy.io

    cell = np.empty((1, len(net.weights)), dtype=object)
    bias = np.empty((1, len(net.weights)), dtype=object)
    for k, (w, b) in enumerate(zip(net.weights, net.biases)):
        cell[0, k] = dense(w)
        bias[0, k] = b.reshape(-1, 1)
    acts = np.empty((1, max(net.depth, 1)), dtype=object)
    for k in range(net.depth):
        if isinstance(net.activations[k], (Mixed, Reflect)):
            raise LipSDPError(
                f"hidden layer {k + 1} is a {net.activations[k].name} layer of a lowered graph (pass-through or "
                "|.| neurons); the .mat layout has no place for them: save the network as .npz"
            )
        acts[0, k] = net.activations[k].label().replace("(", ":").rstrip(")")
    data = {"weights": cell, "biases": bias}
    if net.depth:
        data["activations"] = acts
    scipy.io.savemat(path, data)
