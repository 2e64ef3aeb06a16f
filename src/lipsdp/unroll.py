"""Convolutions, average pooling and padding as explicit matrices on flattened (C, H, W) inputs, and the
windows of max pooling.

A 2-D convolution (zero padding) or average pooling is a linear map of the C-order flattened input, so
LipSDP can treat it as an ordinary affine layer. The matrices are assembled by index arithmetic into a
`scipy.sparse` COO matrix and returned dense (float64), since `Network` stores dense weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from lipsdp.errors import ModelLoadError


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value[0], value[0]
    if len(value) != 2:
        raise ModelLoadError(f"{name} must have two entries (height, width), got {value}")
    return value


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    """Output length of a convolution/pooling window along one axis (floor mode)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def same_padding(size: int, kernel: int, stride: int, dilation: int, upper: bool = True) -> tuple[int, int]:
    """(before, after) padding of 'SAME' mode: output length ceil(size / stride)."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + dilation * (kernel - 1) + 1 - size)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def _window_indices(
    shape: tuple[int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """For every output position (i, j) and kernel offset (p, q): the input row/column and validity.

    Returns (out_h, out_w, rows, cols, valid) with arrays of shape (out_h, out_w, kh, kw).
    """
    _, h, w = shape
    kh, kw = kernel
    sh, sw = stride
    top, left, bottom, right = pads
    dh, dw = dilation
    out_h = conv_output_size(h, kh, sh, top, bottom, dh)
    out_w = conv_output_size(w, kw, sw, left, right, dw)
    if out_h < 1 or out_w < 1:
        raise ModelLoadError(
            f"a {kh}x{kw} window (stride {stride}, padding {pads}, dilation {dilation}) does not fit an input of "
            f"shape {shape}; check input_shape"
        )
    i = np.arange(out_h)[:, None, None, None]
    j = np.arange(out_w)[None, :, None, None]
    p = np.arange(kh)[None, None, :, None]
    q = np.arange(kw)[None, None, None, :]
    rows = i * sh - top + p * dh
    cols = j * sw - left + q * dw
    rows, cols = np.broadcast_arrays(rows, cols)
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return out_h, out_w, rows, cols, valid


def conv2d_matrix(
    weight: np.ndarray,
    input_shape: tuple[int, int, int],
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    sparse: bool = False,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The dense matrix of a zero-padded 2-D convolution (cross-correlation, as in PyTorch and ONNX), or with
    `sparse` the same matrix as scipy COO (no dense array formed).

    weight       (out_channels, in_channels / groups, kh, kw)
    padding      an int, (pad_h, pad_w), or (top, left, bottom, right) as in ONNX
    Returns (matrix of shape (out_channels*out_h*out_w, C*H*W), output shape (out_channels, out_h, out_w)).
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 4:
        raise ModelLoadError(f"a 2-D convolution needs a 4-D kernel (out, in/groups, kh, kw), got {weight.shape}")
    c, h, w = (int(v) for v in input_shape)
    out_c, c_per_group, kh, kw = weight.shape
    if groups < 1 or c % groups or out_c % groups or c // groups != c_per_group:
        raise ModelLoadError(
            f"convolution kernel {weight.shape} with groups={groups} does not match {c} input channels "
            f"(input_shape {tuple(input_shape)})"
        )
    pads = as_pads(padding)
    out_h, out_w, rows, cols, valid = _window_indices((c, h, w), (kh, kw), as_pair(stride, "stride"), pads,
                                                      as_pair(dilation, "dilation"))
    out_per_group = out_c // groups
    # Index grids over (o, ci, i, j, p, q): o output channel, ci channel within its group.
    o = np.arange(out_c)[:, None, None, None, None, None]
    ci = np.arange(c_per_group)[None, :, None, None, None, None]
    in_channel = (o // out_per_group) * c_per_group + ci
    i = np.arange(out_h)[None, None, :, None, None, None]
    j = np.arange(out_w)[None, None, None, :, None, None]
    r = rows[None, None]
    s = cols[None, None]
    shape = (out_c, c_per_group, out_h, out_w, kh, kw)
    mask = np.broadcast_to(valid[None, None], shape)
    row_index = np.broadcast_to((o * out_h + i) * out_w + j, shape)[mask]
    col_index = np.broadcast_to((in_channel * h + r) * w + s, shape)[mask]
    values = np.broadcast_to(weight[:, :, None, None, :, :], shape)[mask]
    n_out = out_c * out_h * out_w
    matrix = sp.coo_array((values, (row_index, col_index)), shape=(n_out, c * h * w))
    return (matrix if sparse else matrix.toarray()), (out_c, out_h, out_w)


def avgpool2d_matrix(
    input_shape: tuple[int, int, int],
    kernel: int | Sequence[int],
    *,
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The dense matrix of 2-D average pooling (floor mode), channel by channel.

    `count_include_pad` divides by the full window size (PyTorch's default) instead of the number of
    in-bounds inputs (ONNX's default).
    """
    c, h, w = (int(v) for v in input_shape)
    kh, kw = as_pair(kernel, "kernel_size")
    st = as_pair(kernel if stride is None else stride, "stride")
    pads = as_pads(padding)
    out_h, out_w, rows, cols, valid = _window_indices((c, h, w), (kh, kw), st, pads, (1, 1))
    if divisor_override:
        divisor = np.full((out_h, out_w), float(divisor_override))
    elif count_include_pad:
        # PyTorch counts padded positions but not windows hanging past the padded border.
        top, left, bottom, right = pads
        r_ok = (rows >= -top) & (rows < h + bottom)
        c_ok = (cols >= -left) & (cols < w + right)
        divisor = (r_ok & c_ok).sum(axis=(2, 3)).astype(float)
    else:
        divisor = valid.sum(axis=(2, 3)).astype(float)
    ch = np.arange(c)[:, None, None, None, None]
    i = np.arange(out_h)[None, :, None, None, None]
    j = np.arange(out_w)[None, None, :, None, None]
    shape = (c, out_h, out_w, kh, kw)
    mask = np.broadcast_to(valid[None], shape)
    row_index = np.broadcast_to((ch * out_h + i) * out_w + j, shape)[mask]
    col_index = np.broadcast_to((ch * h + rows[None]) * w + cols[None], shape)[mask]
    values = np.broadcast_to((1.0 / divisor)[None, :, :, None, None], shape)[mask]
    matrix = sp.coo_matrix((values, (row_index, col_index)), shape=(c * out_h * out_w, c * h * w)).toarray()
    return matrix, (c, out_h, out_w)


def as_pads(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from an int, (pad_h, pad_w) or the ONNX 4-tuple."""
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return p, p, p, p
    padding = tuple(int(v) for v in padding)
    if len(padding) == 2:
        return padding[0], padding[1], padding[0], padding[1]
    if len(padding) == 4:
        return padding  # ONNX order: begin_h, begin_w, end_h, end_w
    raise ModelLoadError(f"padding must be an int, (pad_h, pad_w) or (top, left, bottom, right); got {padding}")


def maxpool2d_windows(
    input_shape: tuple[int, int, int],
    kernel: int | Sequence[int],
    *,
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The windows of 2-D max pooling (floor mode) on the C-order flattened (C, H, W) input.

    Returns (windows, output shape): row i of `windows` holds the input indices of output i's window, -1
    where the window covers padding (which max pooling ignores: it pads with -inf).
    """
    c, h, w = (int(v) for v in input_shape)
    kh, kw = as_pair(kernel, "kernel_size")
    st = as_pair(kernel if stride is None else stride, "stride")
    out_h, out_w, rows, cols, valid = _window_indices((c, h, w), (kh, kw), st, as_pads(padding),
                                                      as_pair(dilation, "dilation"))
    flat = np.where(valid, rows * w + cols, -1).reshape(out_h * out_w, kh * kw)
    if np.any(np.all(flat < 0, axis=1)):
        raise ModelLoadError(f"a max-pooling window lies entirely in the padding (kernel {kernel}, padding {padding})")
    channel = (np.arange(c) * h * w)[:, None, None]
    windows = np.where(flat[None] >= 0, flat[None] + channel, -1).reshape(c * out_h * out_w, kh * kw)
    return windows.astype(np.int64), (c, out_h, out_w)


def pad_matrix(
    shape: Sequence[int], before: Sequence[int], after: Sequence[int], mode: str = "constant", value: float = 0.0
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Padding of a C-order tensor as an affine map y = P x + q: (P, q, output shape).

    `before` / `after` are per-axis amounts (negative ones crop); `mode` is 'constant' (entries `value`),
    'edge' (replicate), 'reflect' (mirror, edge excluded) or 'wrap' (circular), as numpy.pad and ONNX Pad
    define them. P is a 0/1 matrix (each output entry copies one input entry or is the constant).
    """
    shape = tuple(int(v) for v in shape)
    if len(before) != len(shape) or len(after) != len(shape):
        raise ModelLoadError(f"padding {list(before)} / {list(after)} does not match a tensor of shape {shape}")
    index = np.arange(int(np.prod(shape))).reshape(shape)
    crop = tuple(slice(max(0, -int(b)), n - max(0, -int(a))) for b, a, n in zip(before, after, shape))
    index = index[crop]
    if index.size == 0:
        raise ModelLoadError(f"padding {list(before)} / {list(after)} crops the whole tensor of shape {shape}")
    widths = [(max(0, int(b)), max(0, int(a))) for b, a in zip(before, after)]
    if mode == "constant":
        padded = np.pad(index, widths, mode="constant", constant_values=-1)
    elif mode in ("edge", "reflect", "wrap"):
        if mode == "reflect" and any(p >= n for (b, a), n in zip(widths, index.shape) for p in (b, a) if p):
            raise ModelLoadError(f"reflect padding {widths} needs fewer entries than the axis has ({index.shape})")
        padded = np.pad(index, widths, mode=mode)
    else:
        raise ModelLoadError(f"padding mode '{mode}' is not one of constant, edge, reflect, wrap")
    src = padded.reshape(-1)
    inside = src >= 0
    matrix = np.zeros((src.size, int(np.prod(shape))))
    matrix[np.flatnonzero(inside), src[inside]] = 1.0
    bias = np.where(inside, 0.0, float(value))
    return matrix, bias, tuple(padded.shape)
