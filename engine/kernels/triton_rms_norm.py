"""RMSNorm, alone or fused with the residual add before it, in one Triton launch.

Layouts: x, delta (..., N) with unit stride along N (rows may be strided, e.g. views); weight
(N,). Outputs are contiguous (..., N): y in the dtype of weight * x (torch's promotion), s (the
sum) in x's dtype.

One program per row holds the whole row in registers (BLOCK = next power of two >= N, masked,
so N = 576 or 200 work): an fp32 sum of squares, then y = w * (x * rsqrt(mean + eps)) rounded to
x's dtype before the weight multiply, as the reference rounds. add_rms_norm also rounds
s = x + delta to x's dtype once (torch's add) and normalises the rounded s.

Launches: the torch reference is 8 kernels (cast, pow, mean, add, rsqrt, mul, cast, mul), 9 with
the residual add; this is 1. Bytes at Llama-3-8B decode (N = 4096, bf16, one row): rms_norm
reads 8 KB of x and 8 KB of weight and writes 8 KB; add_rms_norm reads 16 KB of x and delta and
writes 16 KB; at 3 TB/s either is ~10 ns of traffic, so the ~2-3 us launch is the whole cost and
counting launches is what matters.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import await_inputs, checked_out, next_power_of_2, pdl_options


@triton.jit
def _rms_norm_kernel(x_ptr, d_ptr, w_ptr, s_ptr, y_ptr, n, stride_x, stride_d, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: may precede the wait
    await_inputs(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        d = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(s_ptr + row * n + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / n
    h = (h * tl.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(y_ptr + row * n + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # (rows, N), a view where x allows it
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _num_warps(block: int) -> int:
    # 4096 channels over 8 warps: 16 per thread, two 16-byte loads in bf16
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _launch(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, s: Tensor | None,
            y: Tensor) -> None:
    n = x.shape[-1]
    x2 = _rows(x)
    d2 = x2 if delta is None else _rows(delta)
    rows = x2.shape[0]
    if rows == 0:
        return
    block = next_power_of_2(n)
    _rms_norm_kernel[(rows,)](x2, d2, weight, y if s is None else s, y, n, x2.stride(0),
                              d2.stride(0), eps, ADD=delta is not None, BLOCK=block,
                              num_warps=_num_warps(block), **pdl_options(x.device))


def rms_norm(x: Tensor, weight: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """x (..., N), weight (N,) → weight * x / rms(x) (..., N), into `out` if given."""
    y = checked_out(out, x.shape, torch.promote_types(x.dtype, weight.dtype), x.device)
    _launch(x, None, weight.contiguous(), eps, None, y)
    return y


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float,
                 out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """x, delta (..., N) → (s, rms_norm(s)) with s = x + delta in x's dtype; `out` = (s, y)."""
    s_out, y_out = out if out is not None else (None, None)
    s = checked_out(s_out, x.shape, x.dtype, x.device)
    y = checked_out(y_out, x.shape, torch.promote_types(x.dtype, weight.dtype), x.device)
    _launch(x, delta, weight.contiguous(), eps, s, y)
    return s, y
