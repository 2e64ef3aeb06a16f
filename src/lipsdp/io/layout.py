"""Tracking reshapes and transposes of the data tensor without forming permutation matrices.

Graph front ends (ONNX, torch.export) see the data as a tensor of some shape; `ChainBuilder` sees a flat
vector y. Reshapes and transposes (NHWC <-> NCHW, Keras' Flatten of a channels-last feature map) only
reorder entries: the tensor, flattened in C order, is y[index] for a permutation `index`. `Layout` keeps
that permutation and folds it, exactly, into the next map that needs the tensor's order: the columns of a
dense or convolution matrix, or the entries of a diagonal (elementwise) map. Elementwise activations
commute with a permutation, so it can wait across them. Only a permutation left at the output becomes an
explicit (0/1) matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lipsdp.errors import UnsupportedLayerError
from lipsdp.weights import is_sparse, stored


class Layout:
    """The data tensor's shape and, when it is not the identity, its order relative to the flat vector."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.index: np.ndarray | None = None  # None: the tensor in C order is the flat vector itself

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def permuted(self) -> bool:
        return self.index is not None

    def reshape(self, shape: Sequence[int], where: str) -> None:
        """A reshape (C order, as ONNX Reshape/Flatten/Squeeze and torch view do): the order is unchanged."""
        shape = tuple(int(v) for v in shape)
        if math.prod(shape) != self.size or any(v < 0 for v in shape):
            raise UnsupportedLayerError(f"{where}: cannot reshape a tensor of shape {self.shape} to {shape}")
        if self.index is not None:
            self.index = self.index.reshape(shape)
        self.shape = shape

    def transpose(self, perm: Sequence[int], where: str) -> None:
        """Permute the axes (ONNX Transpose, torch permute)."""
        ndim = len(self.shape)
        perm = tuple(int(p) % ndim if ndim else int(p) for p in perm)  # negative axes count from the end
        if sorted(perm) != list(range(len(self.shape))):
            raise UnsupportedLayerError(f"{where}: {list(perm)} is not a permutation of the axes of shape {self.shape}")
        current = np.arange(self.size).reshape(self.shape) if self.index is None else self.index
        moved = np.ascontiguousarray(current.transpose(perm))
        self.shape = moved.shape
        flat = moved.reshape(-1)
        self.index = None if np.array_equal(flat, np.arange(flat.size)) else moved

    def columns(self, matrix: np.ndarray) -> np.ndarray:
        """A matrix acting on the tensor (C order) as a matrix acting on the flat vector: columns permuted."""
        if self.index is None:
            return matrix
        if is_sparse(matrix):  # column index[p] of the result is column p of matrix
            return stored(matrix.tocsc()[:, np.argsort(self.index.reshape(-1))])
        out = np.empty_like(matrix)
        out[:, self.index.reshape(-1)] = matrix
        return out

    def vector(self, values: np.ndarray) -> np.ndarray:
        """Per-entry values of the tensor (C order) in the order of the flat vector."""
        if self.index is None:
            return values
        out = np.empty_like(values)
        out[self.index.reshape(-1)] = values
        return out

    def settle(self, shape: Sequence[int]) -> None:
        """After a dense map: a fresh tensor of `shape` in the flat vector's order."""
        self.shape = tuple(int(v) for v in shape)
        self.index = None

    def positions(self) -> np.ndarray:
        """The flat-vector position of every entry of the tensor, in the tensor's shape."""
        if self.index is None:
            return np.arange(self.size).reshape(self.shape)
        return self.index.reshape(self.shape)

    def groups_along(self, axis: int, where: str) -> np.ndarray:
        """The flat positions of the entries along `axis`, one row per group (the other axes in C order)."""
        axis = axis % len(self.shape)
        if axis == 0 and len(self.shape) > 1:
            raise UnsupportedLayerError(f"{where} works along the batch axis")
        return np.moveaxis(self.positions(), axis, -1).reshape(-1, self.shape[axis])

    def output_permutation(self) -> np.ndarray | None:
        """The 0/1 matrix P with output = P y when a permutation is left at the end, else None."""
        if self.index is None:
            return None
        flat = self.index.reshape(-1)
        p = np.zeros((flat.size, flat.size))
        p[np.arange(flat.size), flat] = 1.0
        return p


def concat_layout(parts: Sequence[tuple[tuple[int, ...], np.ndarray | None]], axis: int) -> Layout:
    """The layout of tensors (shape, layout index or None) concatenated along `axis` when their flat vectors
    are stacked one after the other: entry p of the result is entry `index[p]` of the stacked vector."""
    orders, offset = [], 0
    for shape, index in parts:
        size = math.prod(shape)
        orders.append((np.arange(size).reshape(shape) if index is None else index) + offset)
        offset += size
    order = np.concatenate(orders, axis=axis)
    layout = Layout(order.shape)
    layout.index = None if np.array_equal(order.reshape(-1), np.arange(order.size)) else order
    return layout
