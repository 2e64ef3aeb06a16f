"""MATLAB v7.3 `.mat` files (HDF5, written by `save(..., '-v7.3')`), read with h5py.

Same layouts as the v5 reader in `lipsdp.io.arrays`: a cell array `weights` (entries (n_out, n_in)),
optional cell arrays `biases` and `activations` (names), or a single matrix `weights`. MATLAB stores each
variable transposed (its column-major data as an HDF5 row-major array of the reversed shape) and a cell
array as an array of object references to datasets under `#refs#`; the `MATLAB_class` attribute says
what a dataset holds. Only plain numeric and char data are read: links to other files, external or
virtual storage, structs, sparse and complex data are refused before any data is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lipsdp.errors import LipSDPError, ModelLoadError
from lipsdp.network import Network

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_NUMERIC = {"double", "single", "logical", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
            "uint64"}


def is_mat73(path: str | Path) -> bool:
    """True if the file is HDF5-based (a v7.3 MAT-file, or plain HDF5 at offset 0 or 512)."""
    with open(path, "rb") as fh:
        head = fh.read(520)
    return HDF5_SIGNATURE in (head[:8], head[512:520]) or head[124:128] in (b"\x00\x02IM", b"\x02\x00MI")


class _Reader:
    """Reads MATLAB variables from an open h5py.File, refusing anything but plain arrays."""

    def __init__(self, path: Path, file: Any) -> None:
        self.path = path
        self.file = file

    def fail(self, message: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {message}")

    def variable(self, name: str) -> Any:
        import h5py

        link = self.file.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            kind = type(link).__name__
            raise self.fail(f"variable '{name}' is a link ({kind}); lipsdp reads plain MATLAB data")
        return self.dataset(self.file[name], name)

    def dataset(self, obj: Any, what: str) -> Any:
        import h5py

        if not isinstance(obj, h5py.Dataset):
            kind = self._class(obj) or "group"
            sparse = " sparse" if "MATLAB_sparse" in obj.attrs else ""
            raise self.fail(f"{what} is a MATLAB{sparse} {kind}, not a matrix or cell array")
        if obj.external or obj.is_virtual:
            raise self.fail(f"{what} keeps its data outside the file; lipsdp reads self-contained files only")
        from lipsdp.io.chain import MAX_ARRAY_ELEMENTS

        n = int(np.prod(obj.shape, dtype=object)) if obj.shape else 1
        if n > MAX_ARRAY_ELEMENTS:
            raise self.fail(f"{what} claims shape {tuple(reversed(obj.shape))}, beyond what lipsdp accepts")
        return obj

    @staticmethod
    def _class(obj: Any) -> str:
        value = obj.attrs.get("MATLAB_class", b"")
        if isinstance(value, np.ndarray):
            value = value.reshape(-1)[0] if value.size else b""
        return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)

    def cells(self, ds: Any, what: str) -> list[Any]:
        """The entries of a cell array in MATLAB's (column-major) order, or [ds] for a plain array."""
        import h5py

        ref_type = h5py.check_ref_dtype(ds.dtype)
        if ref_type is None:
            return [ds]
        if ref_type is not h5py.Reference or self._class(ds) != "cell":
            raise self.fail(f"{what} holds references but is not a MATLAB cell array")
        refs = np.asarray(ds[()]).reshape(-1)  # HDF5 row-major of the transposed cell = MATLAB's order
        out = []
        for k, ref in enumerate(refs):
            if not ref:
                raise self.fail(f"{what}{{{k + 1}}} is an empty reference")
            out.append(self.dataset(self.file[ref], f"{what}{{{k + 1}}}"))
        return out

    def matrix(self, ds: Any, what: str) -> np.ndarray:
        """A numeric dataset as the MATLAB-shaped array (the transpose of the stored one)."""
        cls = self._class(ds)
        if cls == "cell":
            raise self.fail(f"{what} is a cell array nested in a cell array; give numeric matrices")
        if cls and cls not in _NUMERIC:
            raise self.fail(f"{what} is MATLAB class '{cls}', not a numeric matrix")
        if ds.attrs.get("MATLAB_empty", 0):
            return np.zeros((0, 0))
        if ds.dtype.names is not None:
            raise self.fail(f"{what} is complex or compound data; lipsdp reads real matrices")
        if ds.dtype.kind not in "biuf":
            raise self.fail(f"{what} holds {ds.dtype} data, not numbers")
        return np.asarray(ds[()]).T

    def text(self, ds: Any, what: str) -> str:
        """A MATLAB char array (UTF-16 code units) as a string; rows are concatenated."""
        if self._class(ds) != "char" or ds.dtype.kind not in "iu":
            raise self.fail(f"{what} is not a MATLAB char array (an activation name such as 'relu')")
        if ds.attrs.get("MATLAB_empty", 0):
            return ""
        units = np.asarray(ds[()]).T.reshape(-1).astype("<u2")
        return units.tobytes().decode("utf-16-le", errors="replace")


def load_mat73(path: str | Path, activation: str | None = None) -> Network:
    """Read a MATLAB v7.3 (HDF5) `.mat` file in the original LipSDP layout (see the module docstring)."""
    import h5py

    from lipsdp.io.chain import build_from_arrays as _build
    from lipsdp.io.chain import named_activations

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            reader = _Reader(path, f)
            key = "weights" if "weights" in f else "W" if "W" in f else None
            if key is None:
                names = [k for k in f if not k.startswith("#")]
                raise reader.fail(f"no cell array named 'weights' or 'W' (variables present: {names})")
            cells = reader.cells(reader.variable(key), key)
            weights = [reader.matrix(c, f"{key}{{{k + 1}}}") for k, c in enumerate(cells)]
            biases = None
            if "biases" in f:
                cells = reader.cells(reader.variable("biases"), "biases")
                biases = [reader.matrix(c, f"biases{{{k + 1}}}").reshape(-1) for k, c in enumerate(cells)]
            activations: str | list[str] | None = None
            if "activations" in f:
                cells = reader.cells(reader.variable("activations"), "activations")
                names = [reader.text(c, f"activations{{{k + 1}}}") for k, c in enumerate(cells)]
                activations = names[0] if len(names) == 1 else names
    except LipSDPError:
        raise
    except Exception as exc:  # noqa: BLE001 - HDF5 reports damage as OSError, KeyError, ValueError, ...
        raise ModelLoadError(
            f"{path}: not a readable MATLAB v7.3 (HDF5) .mat file ({type(exc).__name__}: {exc})"
        ) from None
    return _build(str(path), weights, biases, named_activations(str(path), activations, activation) or "relu")
