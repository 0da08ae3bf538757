"""Affine quantization along the input dimension, parametrised by block (group) size.

One primitive covers per-channel (group_size = K) and per-group quantization. A weight is (N, K):
N output channels, K input features; group g of row n covers input columns
[g*gs, min((g+1)*gs, K)), so when K % gs != 0 the last group is ragged (K=576, gs=128: 5 groups,
the last of 64 columns). Scales and zero points are (N, G) with G = ceil(K / gs).

Dequantization is one formula for every variant: w = (q - z) * s, with z = 0 when symmetric.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class QuantizationError(ValueError):
    """Input the quantizer cannot honour (wrong rank, odd K for int4 packing, bad bit width)."""


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def symmetric_range(bits: int) -> tuple[int, int]:
    """Signed integer range of a symmetric code. int8 uses [-127, 127] (no -128) so negation is
    exact; int4 uses the full [-8, 7] because its scale is absmax/8 (see `_symmetric_scale`)."""
    if bits == 8:
        return -127, 127
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _symmetric_scale(absmax: Tensor, bits: int) -> Tensor:
    if bits == 8:
        return absmax / 127
    # int4: s = absmax/8, so a group's largest positive weight clips to 7s. Measured MSE of
    # round-to-nearest on N(0,1) weights (1536x1152, fp32): group 128: absmax/8 0.01114,
    # absmax/7 0.01375, absmax/7.5 0.01226, sign-aware max(-min/8, max/7) 0.01246;
    # group 32: absmax/8 0.00879, absmax/7 0.00942, sign-aware 0.00846. absmax/8 is best at the
    # default group size and within 4% of the best at 32.
    return absmax / (1 << (bits - 1))


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """(N, K) -> (N, G, gs) fp32, zero-padding the ragged last group. Padding with zeros leaves
    absmax unchanged and, since min <= 0 <= max is enforced, leaves min/max unchanged too."""
    n, k = w.shape
    pad = num_groups(k, group_size) * group_size - k
    w = w.float()
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(n, -1, group_size)  # (N, G, gs)


def _check(w: Tensor, bits: int, group_size: int) -> None:
    if w.dim() != 2:
        raise QuantizationError(f"expected a 2-D weight (out_features, in_features), got shape "
                                f"{tuple(w.shape)}")
    if bits not in (4, 8):
        raise QuantizationError(f"only 4- and 8-bit codes are supported, not {bits}")
    if group_size < 1:
        raise QuantizationError(f"group size must be positive, not {group_size}")
    if not w.is_floating_point():
        raise QuantizationError(f"weight must be floating point, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise QuantizationError("weight contains NaN or infinity")


def quantize_affine(w: Tensor, bits: int, group_size: int, symmetric: bool,
                    scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest quantization of w (N, K) in groups of `group_size` input columns.

    Returns (q, scale, zero):
      symmetric:  q int8 (N, K) in `symmetric_range(bits)`, scale (N, G) scale_dtype, zero None.
      asymmetric: q uint8 (N, K) in [0, 2**bits - 1], scale (N, G), zero uint8 (N, G) in the same
                  range; s = (max - min) / (2**bits - 1), z = clamp(round(-min / s)), with the
                  range widened to include 0 (min <= 0 <= max) so z always fits.
    Scale and zero are searched in fp32, then the scale is rounded to `scale_dtype` before q is
    computed, so q is exact against the stored scale.
    """
    _check(w, bits, group_size)
    n, k = w.shape
    g = _grouped(w, group_size)  # (N, G, gs)
    if symmetric:
        qmin, qmax = symmetric_range(bits)
        scale = _symmetric_scale(g.abs().amax(dim=-1), bits)  # (N, G)
        zero = None
    else:
        qmin, qmax = 0, (1 << bits) - 1
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / qmax
    # an all-zero group has scale 0; any positive scale reproduces it exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    s32 = scale.float()
    if symmetric:
        q = torch.round(g / s32.unsqueeze(-1)).clamp(qmin, qmax)
        q = q.to(torch.int8)
    else:
        zero = torch.round(-lo / s32).clamp(qmin, qmax)
        q = (torch.round(g / s32.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(qmin, qmax)
        q = q.to(torch.uint8)
        zero = zero.to(torch.uint8)
    q = q.reshape(n, -1)[:, :k].contiguous()  # (N, K), ragged padding dropped
    return q, scale, zero


def dequantize_affine(q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int,
                      dtype: torch.dtype | None = None) -> Tensor:
    """w[n, k] = (q[n, k] - z[n, k // gs]) * s[n, k // gs], computed in fp32 and returned in
    `dtype` (default: the scale's dtype). q is (N, K); scale and zero are (N, G)."""
    n, k = q.shape
    g = _grouped(q, group_size)  # (N, G, gs) fp32
    if zero is not None:
        g = g - zero.float().unsqueeze(-1)
    w = (g * scale.float().unsqueeze(-1)).reshape(n, -1)[:, :k]  # (N, K)
    return w.to(dtype or scale.dtype)


def pack_int4(u: Tensor) -> Tensor:
    """(N, K) unsigned nibbles u in [0, 15] -> (N, K // 2) uint8 with
    byte[n, j] = u[n, 2j] | (u[n, 2j + 1] << 4): the even input index in the low nibble."""
    if u.shape[-1] % 2:
        raise QuantizationError(f"int4 packing needs an even number of input features, got "
                                f"{u.shape[-1]}")
    u = u.to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(b: Tensor) -> Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 nibbles in [0, 15]; exact inverse of `pack_int4`."""
    lo = b & 0x0F
    hi = b >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)  # (N, K)
