"""A 2-D convolution as a linear operator, and a proven upper bound on its spectral norm.

`Conv2d` is the zero-padded cross-correlation of PyTorch and ONNX (stride, dilation, groups, asymmetric
padding) on C-order flattened (C, H, W) images. Its products go through `torch.nn.functional.conv2d` and
its transpose, so they cost the kernel's size times the image's, never a dense matrix; `dense()` gives the
matrix of `lipsdp.unroll.conv2d_matrix` (the same floats) where a small one is wanted.

`norm_upper()` proves ||A||_2 <= bound without forming A. The argument, step by step (each map named
here is a coordinate embedding, a coordinate restriction or a permutation, so none raises the norm):

1. Zero padding embeds the image isometrically in the padded image; the rows and columns that no output
   reads are dropped (a restriction). Dilation inserts zero taps into the kernel (the same map).
2. Stride s: padded row s*i + p with p = s*a + r is row i + a of phase r, so the strided convolution is a
   stride-1 convolution of the s_h*s_w phase images (C*s_h*s_w channels, P_h x P_w pixels, kernel
   K'[:, (c, r), a] = K[:, c, s*a + r]). Splitting an image into its phases is a permutation onto part of
   the phase images, so the phase map's norm bounds the original's.
3. Output (i, j) of that stride-1 map reads phase pixels (i + a, j + b) < (P_h, P_w): no index wraps around
   on the P_h x P_w torus, so it is a restriction of the circular convolution there, whose norm is
   max over the P_h * P_w frequencies w of ||K^(w)||_2, K^(w) = sum_(a, b) K'[:, :, a, b] e^(-2 pi i (a w_h / P_h + b w_w / P_w))
   (the circular convolution is block-circulant; the 2-D DFT block-diagonalises it).
4. Each ||K^(w)||_2 is proved by `lipsdp.certificate.certify` on its real form [[Re, -Im], [Im, Re]] (same
   singular values). The computed K^(w) differs from the exact one by at most delta per real entry,
   delta = (40 u + g_(T+2) (1 + 40 u)) sum_t |K'_t| (u = 2^-53, T taps, g_k = k u / (1 - k u); Higham's
   inner-product bound and twiddles e^(-i theta) within 40 u: theta = 2 pi m / M from an exact integer
   phase m < M, rounded twice (<= 8 pi u < 26 u), numpy's cos / sin within 4 ulp (<= 8 u)), so
   ||error||_2 <= ||error||_F <= sqrt(2) ||delta||_F is added; the sum is rounded upwards.
For stride 1 and images much larger than the kernel the bound is close to the exact norm (the torus
differs from the zero-padded plane only at the border); for strided or tiny images it can be looser.
Guarantee: an upper bound on the spectral norm of the convolution with exactly these float64 weights
(assuming numpy's float64 cos / sin are within 4 ulp, as its documented implementations are).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from lipsdp.certificate import UNIT_ROUNDOFF, certify, gamma
from lipsdp.errors import ModelLoadError, VerificationError
from lipsdp.network import Network
from lipsdp.unroll import as_pads, as_pair, conv2d_matrix, conv_output_size
from lipsdp.weights import equal, stored


@dataclass(frozen=True, eq=False)
class Conv2d:
    """A zero-padded 2-D convolution on flattened (C, H, W) images: y = A x with A of shape
    (out_channels * out_h * out_w, C * H * W). Build it with `Conv2d.make`."""

    weight: np.ndarray  # (out_channels, in_channels / groups, kh, kw), float64
    in_shape: tuple[int, int, int]
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def make(
        cls,
        weight: np.ndarray,
        in_shape: Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
    ) -> Conv2d:
        """Normalise and check the arguments (`padding`: an int, (pad_h, pad_w) or ONNX's (top, left,
        bottom, right)); a kernel that does not fit the image raises `ModelLoadError`."""
        weight = np.array(weight, dtype=np.float64)
        if weight.ndim != 4:
            raise ModelLoadError(f"a 2-D convolution needs a 4-D kernel (out, in/groups, kh, kw), got {weight.shape}")
        c, h, w = (int(v) for v in in_shape)
        if groups < 1 or c % groups or weight.shape[0] % groups or c // groups != weight.shape[1]:
            raise ModelLoadError(
                f"convolution kernel {weight.shape} with groups={groups} does not match {c} input channels"
            )
        op = cls(weight, (c, h, w), as_pair(stride, "stride"), as_pads(padding), as_pair(dilation, "dilation"), int(groups))
        if min(op.out_shape[1:]) < 1:
            raise ModelLoadError(f"a {weight.shape[2:]} kernel does not fit an input of shape {(c, h, w)}")
        return op

    @property
    def out_shape(self) -> tuple[int, int, int]:
        _, h, w = self.in_shape
        top, left, bottom, right = self.pads
        kh, kw = self.weight.shape[2:]
        out_h = conv_output_size(h, kh, self.stride[0], top, bottom, self.dilation[0])
        out_w = conv_output_size(w, kw, self.stride[1], left, right, self.dilation[1])
        return (self.weight.shape[0], out_h, out_w)

    @property
    def shape(self) -> tuple[int, int]:
        return (math.prod(self.out_shape), math.prod(self.in_shape))

    def _torch(self):
        import torch

        return torch, torch.from_numpy(self.weight)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """A x for x of shape (n_in,) or (batch, n_in), in float64."""
        torch, k = self._torch()
        import torch.nn.functional as F

        x = np.asarray(x, dtype=np.float64)
        batch = x.reshape(-1, *self.in_shape)
        top, left, bottom, right = self.pads
        padded = F.pad(torch.from_numpy(batch), (left, right, top, bottom))
        y = F.conv2d(padded, k, stride=self.stride, dilation=self.dilation, groups=self.groups)
        return y.numpy().reshape(x.shape[:-1] + (self.shape[0],))

    def apply_transpose(self, y: np.ndarray) -> np.ndarray:
        """A' y for y of shape (n_out,) or (batch, n_out), in float64."""
        torch, k = self._torch()
        import torch.nn.functional as F

        y = np.asarray(y, dtype=np.float64)
        batch = torch.from_numpy(y.reshape(-1, *self.out_shape))
        x = F.conv_transpose2d(batch, k, stride=self.stride, dilation=self.dilation, groups=self.groups)
        c, h, w = self.in_shape
        top, left, bottom, right = self.pads
        full = torch.zeros((x.shape[0], c, h + top + bottom, w + left + right), dtype=torch.float64)
        full[:, :, : x.shape[2], : x.shape[3]] = x  # padded rows / columns no output reads get 0
        out = full[:, :, top : top + h, left : left + w]
        return out.reshape(y.shape[:-1] + (self.shape[1],)).numpy().copy()

    def scaled(self, exponent: int) -> Conv2d:
        """The operator times 2^exponent (exact: every weight is multiplied by a power of two)."""
        return replace(self, weight=np.ldexp(self.weight, int(exponent)))

    def dense(self) -> np.ndarray:
        """The dense matrix (as `lipsdp.unroll.conv2d_matrix`): only for small sizes."""
        return conv2d_matrix(
            self.weight, self.in_shape, stride=self.stride, padding=self.pads, dilation=self.dilation, groups=self.groups
        )[0]

    def matrix(self):
        """The matrix in the form a network stores it (`lipsdp.weights.stored`: CSR when large), never
        formed densely on the way."""
        return stored(self._coo())

    def matches(self, matrix) -> bool:
        """Whether `matrix` (dense or CSR) is exactly this operator's matrix (so a bound proved for one holds
        for the other)."""
        return matrix.shape == self.shape and equal(self._coo(), matrix)

    def _coo(self):
        return conv2d_matrix(
            self.weight, self.in_shape, stride=self.stride, padding=self.pads, dilation=self.dilation,
            groups=self.groups, sparse=True,
        )[0]

    def norm_estimate(self, iterations: int = 100, seed: int = 0) -> float:
        """||A x|| / ||x|| after power iteration on A'A: a lower bound on ||A||_2 (not a proof of an upper)."""
        x = np.random.default_rng(seed).standard_normal(self.shape[1])
        est = 0.0
        for _ in range(iterations):
            x /= np.linalg.norm(x)
            y = self.apply(x)
            est = float(np.linalg.norm(y))
            x = self.apply_transpose(y)
            if not np.any(x):
                break
        return est

    def phase_kernel(self) -> np.ndarray:
        """K' of the module docstring: the stride-1 kernel on the phase images, groups expanded, dilation
        written as zero taps; shape (out_channels, C * s_h * s_w, A_h, A_w)."""
        o, cg, kh, kw = self.weight.shape
        c = self.in_shape[0]
        dh, dw = self.dilation
        full = np.zeros((o, c, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
        per_group = o // self.groups
        for g in range(self.groups):
            full[g * per_group : (g + 1) * per_group, g * cg : (g + 1) * cg, ::dh, ::dw] = self.weight[
                g * per_group : (g + 1) * per_group
            ]
        sh, sw = self.stride
        ah, aw = -(-full.shape[2] // sh), -(-full.shape[3] // sw)
        out = np.zeros((o, c, sh, sw, ah, aw))
        for rh in range(sh):
            for rw in range(sw):
                taps = full[:, :, rh::sh, rw::sw]
                out[:, :, rh, rw, : taps.shape[2], : taps.shape[3]] = taps
        return out.reshape(o, c * sh * sw, ah, aw)

    def phase_grid(self) -> tuple[int, int]:
        """(P_h, P_w): the phase images' size, out + A - 1 per axis (every index an output reads)."""
        k = self.phase_kernel()
        _, out_h, out_w = self.out_shape
        return out_h + k.shape[2] - 1, out_w + k.shape[3] - 1

    def frequency_matrices(self) -> np.ndarray:
        """K^(w) for every frequency of the P_h x P_w torus, shape (P_h * P_w, out_channels, C s_h s_w),
        complex; the twiddles from exact integer phases (see the module docstring)."""
        k = self.phase_kernel()
        ph, pw = self.phase_grid()
        m = ph * pw
        a = np.arange(k.shape[2])[:, None, None, None]
        b = np.arange(k.shape[3])[None, :, None, None]
        wh = np.arange(ph)[None, None, :, None]
        ww = np.arange(pw)[None, None, None, :]
        phase = (a * wh * pw + b * ww * ph) % m  # exact integers: theta = 2 pi phase / m
        theta = (2.0 * math.pi) * (phase / m)
        taps = k.reshape(k.shape[0], k.shape[1], -1)
        cos = np.cos(theta).reshape(taps.shape[2], m)
        sin = np.sin(theta).reshape(taps.shape[2], m)
        re = np.einsum("oct,tf->foc", taps, cos)
        im = -np.einsum("oct,tf->foc", taps, sin)
        return re + 1j * im

    def norm_upper(self) -> float:
        """A proven upper bound on ||A||_2 (module docstring); raises `VerificationError` if a proof fails."""
        k = self.phase_kernel()
        if not np.any(k):
            return 0.0
        best = 0.0
        for mat in self.frequency_matrices():
            real = np.block([[mat.real, -mat.imag], [mat.imag, mat.real]])
            cert = certify(Network.from_arrays([real], []), None)
            if cert is None:
                raise VerificationError("could not prove a convolution's spectral norm at one frequency")
            best = max(best, cert.upper)
        taps = k.shape[2] * k.shape[3]
        twiddle = 40.0 * UNIT_ROUNDOFF
        delta = (twiddle + gamma(taps + 2) * (1.0 + twiddle)) * np.abs(k).sum(axis=(2, 3))
        error = math.sqrt(2.0) * float(np.linalg.norm(delta)) * (1.0 + 1e-6)
        return math.nextafter((best + error) * (1.0 + 4.0 * UNIT_ROUNDOFF), math.inf)
