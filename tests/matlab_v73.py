"""A tiny writer of MATLAB v7.3 MAT-files (HDF5) in MATLAB's own layout, independent of lipsdp's reader.

What MATLAB's `save(..., '-v7.3')` does, as far as lipsdp needs it: a 512-byte user block holding the
128-byte MAT header (text, version 0x0200, endian 'IM'); each variable a dataset with the attribute
MATLAB_class; an (m, n) matrix stored as its transpose (HDF5 shape (n, m)); a cell array as an array of
object references (also transposed) to datasets in the group '#refs#'; char arrays as uint16 code units.
Used by tests/test_mat73.py and, for seed files, by fuzz/fuzz_loaders.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


class Cell(list):
    """A MATLAB cell array (a row, 1 x n) of the values it holds."""


def _put(file: h5py.File, group: h5py.Group, name: str, value: Any) -> h5py.Dataset:
    if isinstance(value, Cell):
        refs = np.empty((len(value), 1), dtype=h5py.ref_dtype)  # a 1 x n cell, transposed
        for i, item in enumerate(value):
            refs[i, 0] = _put(file, file.require_group("#refs#"), f"{name}_{i}", item).ref
        ds = group.create_dataset(name, data=refs)
        ds.attrs["MATLAB_class"] = np.bytes_("cell")
        return ds
    if isinstance(value, str):  # a 1 x n char row
        ds = group.create_dataset(name, data=np.array([[ord(c)] for c in value], dtype=np.uint16))
        ds.attrs["MATLAB_class"] = np.bytes_("char")
        return ds
    arr = np.asarray(value, dtype=float)
    arr = arr.reshape(-1, 1) if arr.ndim == 1 else arr  # MATLAB has no 1-d arrays: a column vector
    ds = group.create_dataset(name, data=arr.T)
    ds.attrs["MATLAB_class"] = np.bytes_("double")
    return ds


def write_mat73(path: str | Path, variables: dict[str, Any]) -> None:
    """Write `variables` (numpy matrices, strings, `Cell`s of those) as a MATLAB v7.3 MAT-file."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in variables.items():
            _put(f, f, name, value)
    with open(path, "r+b") as fh:
        fh.write(HEADER.ljust(116) + b"\0" * 8 + b"\x00\x02IM")


def write_network(path: str | Path, net: Any) -> None:
    """A lipsdp Network in the original LipSDP layout: cells `weights`, `biases` (columns), `activations`."""
    variables: dict[str, Any] = {
        "weights": Cell(net.weights),
        "biases": Cell(b.reshape(-1, 1) for b in net.biases),
    }
    if net.depth:
        variables["activations"] = Cell(a.label().replace("(", ":").rstrip(")") for a in net.activations)
    write_mat73(path, variables)
