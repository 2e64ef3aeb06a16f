"""Weight matrices as a network stores them: a dense float64 array, or a CSR matrix (scipy.sparse) for a
large, mostly-zero one such as an unrolled convolution, and the products the LMI code takes on either.

An unrolled CIFAR-10 convolution is a 32768 x 3072 matrix with 27 nonzeros per row: 805 MB dense, 10 MB as
CSR. `stored` chooses the form; both hold exactly the same float64 numbers, so every bound and proof is the
same whichever form a weight has (a product may sum its nonzero terms in another order, which the rounding
arguments allow: they count nonzero terms, in any order).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

SPARSE_MIN_ENTRIES = 1 << 20  # a weight with this many entries or more ...
SPARSE_MAX_DENSITY = 0.25  # ... and at most this fraction of them nonzero is kept as a CSR matrix


def is_sparse(w) -> bool:
    return sp.issparse(w)


def entries(w) -> int:
    """The number of entries of the matrix, zeros included (n_out * n_in)."""
    return int(np.prod(w.shape))


def nonzeros(w) -> int:
    """The number of nonzero entries."""
    return int(np.count_nonzero(w.data) if sp.issparse(w) else np.count_nonzero(w))


def stored(w) -> np.ndarray | sp.csr_array:
    """w (dense or sparse) as a CSR matrix when it has at least SPARSE_MIN_ENTRIES entries and at most
    SPARSE_MAX_DENSITY of them are nonzero, else as a C-contiguous float64 array; the same numbers."""
    if sp.issparse(w):
        csr = sp.csr_array(w, dtype=np.float64)
        csr.eliminate_zeros()
        csr.sort_indices()
        if entries(csr) >= SPARSE_MIN_ENTRIES and csr.nnz <= SPARSE_MAX_DENSITY * entries(csr):
            return csr
        return dense(csr)
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 2 and w.size >= SPARSE_MIN_ENTRIES and np.count_nonzero(w) <= SPARSE_MAX_DENSITY * w.size:
        return sp.csr_array(w)
    return np.ascontiguousarray(w)


def all_finite(w) -> bool:
    """Every stored entry of a dense or sparse matrix is finite."""
    return bool(np.all(np.isfinite(w.data if sp.issparse(w) else w)))


def dense(m) -> np.ndarray:
    """m as a C-contiguous float64 array."""
    return np.ascontiguousarray(m.toarray() if sp.issparse(m) else m, dtype=np.float64)


def gram(w, s: np.ndarray) -> np.ndarray:
    """W' diag(s) W, dense."""
    if sp.issparse(w):
        return dense(w.T @ (sp.diags_array(s) @ w))
    return w.T @ (s[:, None] * w)


def cogram(w, s: np.ndarray) -> np.ndarray:
    """W diag(s) W', dense."""
    if sp.issparse(w):
        return dense((w @ sp.diags_array(s)) @ w.T)
    return (w * s[None, :]) @ w.T


def chain(w_out, s: np.ndarray, w_in) -> np.ndarray:
    """W_out diag(s) W_in, dense."""
    if sp.issparse(w_out) or sp.issparse(w_in):
        return dense((sp.csr_array(w_out) @ sp.diags_array(s)) @ sp.csr_array(w_in))
    return (w_out * s[None, :]) @ w_in


def scale_rows(w, s: np.ndarray):
    """diag(s) W, in w's form."""
    return sp.csr_array(sp.diags_array(s) @ w) if sp.issparse(w) else s[:, None] * w


def scale_columns(w, s: np.ndarray):
    """W diag(s), in w's form."""
    return sp.csr_array(w @ sp.diags_array(s)) if sp.issparse(w) else w * s[None, :]


def most_per_row(w) -> int:
    """The most nonzero entries in one row of w."""
    if sp.issparse(w):
        return int(np.diff(sp.csr_array(w).indptr).max(initial=0))
    return int(np.count_nonzero(w, axis=1).max(initial=0))


def most_per_column(w) -> int:
    """The most nonzero entries in one column of w."""
    if sp.issparse(w):
        w = sp.csr_array(w)
        return int(np.bincount(w.indices, minlength=w.shape[1]).max(initial=0))
    return int(np.count_nonzero(w, axis=0).max(initial=0))


def nonzero_rows(w) -> np.ndarray:
    """Whether each row holds a nonzero entry (boolean vector)."""
    if sp.issparse(w):
        w = sp.csr_array(w)
        rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
        return np.bincount(rows[w.data != 0], minlength=w.shape[0]) > 0
    return np.any(w != 0, axis=1)


def nonzero_columns(w) -> np.ndarray:
    """Whether each column holds a nonzero entry (boolean vector)."""
    if sp.issparse(w):
        w = sp.csr_array(w)
        return np.bincount(w.indices[w.data != 0], minlength=w.shape[1]) > 0
    return np.any(w != 0, axis=0)


def largest_magnitude(w) -> float:
    """max |w_ij| (0 for an all-zero matrix), without a |w| copy."""
    values = w.data if sp.issparse(w) else w
    return max(float(np.max(values, initial=0.0)), -float(np.min(values, initial=0.0)))


def ldexp(w, exponent: int):
    """w * 2^exponent entry by entry (exact unless it leaves the normal range), in w's form."""
    if sp.issparse(w):
        out = sp.csr_array(w, copy=True)
        out.data = np.ldexp(out.data, int(exponent))
        return out
    return np.ldexp(w, int(exponent))


def equal(a, b) -> bool:
    """Whether two matrices (dense or sparse) hold exactly the same numbers."""
    if a.shape != b.shape:
        return False
    if sp.issparse(a) or sp.issparse(b):
        return (sp.csr_array(a) != sp.csr_array(b)).nnz == 0
    return bool(np.array_equal(a, b))


def row_norms(w) -> np.ndarray:
    """The Euclidean norm of each row (as numpy's: a sum of squares, then its square root)."""
    if sp.issparse(w):
        return np.sqrt(np.asarray(sp.csr_array(w).multiply(w).sum(axis=1)).reshape(-1))
    return np.linalg.norm(w, axis=1)


def is_identity(w) -> bool:
    """Whether w is exactly the identity matrix."""
    if w.shape[0] != w.shape[1]:
        return False
    if sp.issparse(w):
        return equal(w, sp.eye_array(w.shape[0], format="csr"))
    return bool(np.array_equal(w, np.eye(w.shape[0])))
