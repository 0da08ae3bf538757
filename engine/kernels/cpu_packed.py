"""dequant_matmul on CPU through torch's packed weight-only kernels (backend "cpu-packed").

int8, per-channel: aten._weight_int8pack_mm(x (M, K), q int8 (N, K), s (N,)) -> x @ (q*s).T.
int4: aten._convert_weight_to_int4pack_for_cpu(u int32 (N, K), innerKTiles) repacks the nibbles,
      aten._weight_int4pack_mm_for_cpu(x (M, K), packed, gs, sz (G, N, 2)) computes
      w = (u - 8) * s + zf per group (tinygemm's float zero). lowbit's integer zero z maps to
      zf = (8 - z) * s, which makes that (u - z) * s exactly in real arithmetic.
Constraints (torch 2.13 on this machine, same checks in pytorch main's LinearAlgebra.cpp):
x 2-D and contiguous, fp32/fp16/bf16, scales in x's dtype (else "expected scalar type Float but
found BFloat16"), int4 group size in {32, 64, 128, 256} with K % gs == 0, N % 16 == 0, and
(found here, not checked by torch) K % 16 == 0 for bf16 int8, which otherwise segfaults or
returns NaN. A ragged last group (K=576, gs=128) is handled by padding K to G*gs: the repacked weight gets
nibbles of 8 there and x gets zero columns (a copy of x, cheap at the row counts used here).
Repacked weights and cast scales are built on first use and cached on the format
object per activation dtype. The int4 repack is a second copy of the packed weight (N*K/2 bytes):
the canonical buffers stay for saving and for other backends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.quant.formats import Int4Weight, Int8Weight

from . import registry
from .reference import check_dequant_matmul_args

BACKEND = "cpu-packed"
INT4_GROUP_SIZES = (32, 64, 128, 256)

# When it is faster than the reference, measured on this 2-core AMD EPYC (avx512_bf16), torch
# 2.13, best of 15, weight N x K = 1536x576 (576x1536 similar; the CPU was shared, so +-30%),
# reference = dequantize + F.linear:
#   bf16, M=1:   int8 20 us vs 187 us, int4 g64 18 us vs 401 us
#   bf16, M=16:  int8 98 vs 224, int4 87 vs 425;  M=32: int8 189 vs 267;  M=48: int8 280 vs 295
#   bf16, M=64:  int8 373 vs 327 (slower), int4 365 vs 545;  M=128: int4 682 vs 617 (slower)
#   fp32, M=1:   int8 287 vs 372, int4 652 vs 640;  M=64: int8 19.0 ms vs 1.0 ms, int4 41 ms vs 1.3 ms
#   fp16, M=1:   int8 326 vs 141, int4 654 vs 349 (both slower at every M)
# Only the bf16 kernels are fast here (fp32/fp16 time grows linearly with M, ~300 us a row for
# int8, ~650 for int4). So bf16 only,
# up to the row counts where the packed kernel stops winning.
MAX_ROWS = {Int8Weight: 32, Int4Weight: 64}


def can_run(x: Tensor, weight, bias: Tensor | None = None) -> str | None:
    """The hard constraints of torch's packed CPU kernels; None when they can run these args."""
    reason = check_dequant_matmul_args(x, weight, bias)
    if reason is not None:
        return reason
    if x.device.type != "cpu":
        return f"runs on cpu only, activation is on {x.device}"
    if isinstance(weight, Int8Weight):
        if weight.group_size is not None and weight.group_size < weight.in_features:
            return f"int8 needs per-channel scales, layer has groups of {weight.group_size}"
        if x.dtype == torch.bfloat16 and weight.in_features % 16:
            # torch 2.13's bf16 path reads 16 columns at a time: K=200 segfaults or returns NaN
            return f"bf16 int8 kernel needs K divisible by 16, got {weight.in_features}"
        return None
    if isinstance(weight, Int4Weight):
        if weight.group_size not in INT4_GROUP_SIZES:
            return f"int4 group size {weight.group_size} not in {INT4_GROUP_SIZES}"
        if weight.out_features % 16:
            return f"int4 needs out_features divisible by 16, got {weight.out_features}"
        return None
    return f"unsupported weight format {type(weight).__name__}"


def supports(x: Tensor, weight, bias: Tensor | None = None) -> str | None:
    """can_run, restricted to where it measured faster than the reference (see MAX_ROWS)."""
    reason = can_run(x, weight, bias)
    if reason is not None:
        return reason
    if x.dtype != torch.bfloat16:
        return f"{str(x.dtype).removeprefix('torch.')} activations: measured slower than reference"
    rows = x.numel() // x.shape[-1]
    limit = MAX_ROWS[type(weight)]
    if rows > limit:
        return f"{rows} rows > {limit}: measured slower than reference"
    return None


def _int8_scales(weight: Int8Weight, dtype: torch.dtype) -> Tensor:
    key = (BACKEND, dtype)
    if key not in weight.repacked:
        weight.repacked[key] = weight.scales.reshape(-1).to(dtype).contiguous()  # (N,)
    return weight.repacked[key]


def _int4_packed(weight: Int4Weight, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    key = (BACKEND, dtype)
    if key not in weight.repacked:
        u = weight.unpacked().to(torch.int32)  # (N, K)
        u = F.pad(u, (0, _padded_k(weight) - weight.in_features), value=8)  # (N, G*gs)
        # innerKTiles only matters to the CUDA layout; the CPU kernel accepts any of 1..8
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
        s = weight.scales.float()
        zf = (8 - weight.zero_points().float()) * s
        sz = torch.stack((s, zf), dim=-1).transpose(0, 1).to(dtype).contiguous()  # (G, N, 2)
        weight.repacked[key] = (packed, sz)
    return weight.repacked[key]


def _padded_k(weight: Int4Weight) -> int:
    return weight.scales.shape[1] * weight.group_size


def dequant_matmul(x: Tensor, weight: Int4Weight | Int8Weight, bias: Tensor | None = None) -> Tensor:
    """(..., K) x (N, K) quantized -> (..., N) in x's dtype, via torch's packed CPU kernels."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    if isinstance(weight, Int8Weight):
        y = torch.ops.aten._weight_int8pack_mm(x2, weight.qweight, _int8_scales(weight, x.dtype))
    else:
        packed, sz = _int4_packed(weight, x.dtype)
        x2 = F.pad(x2, (0, _padded_k(weight) - weight.in_features))  # (M, G*gs)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, weight.group_size, sz)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, weight.out_features)  # (..., N)


registry.register("dequant_matmul", BACKEND, dequant_matmul, supports=supports,
                  priority={"cpu": 10}, can_run=can_run)
