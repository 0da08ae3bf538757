"""The "triton" backend of dequant_matmul: fused int4/int8 kernels on CUDA.

Registered with cuda priority 10 (the torch reference is 100). On CPU it runs only under the
Triton interpreter (TRITON_INTERPRET=1, tests) and only when forced: it is never picked there.
Inside, the number of activation rows M picks the kernel (triton_int4_matmul.default_plan and
triton_int8_matmul.default_plan): int4 takes the tensor-core decode path (biased codes from the
canonical bytes, triton_gemv_tc.py) up to M = 16, int8 a CUDA-core GEMV at M = 1 and a tl.dot
skinny GEMM above; both a tl.dot skinny GEMM with split-K up to M = 64, and above that the layer
dequantized into a reused scratch + cuBLAS.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quant.formats import Int4Weight, Int8Weight

from . import registry
from .reference import check_dequant_matmul_args

BACKEND = "triton"

try:
    from .triton_common import Plan, interpreting
    from .triton_int4_matmul import int4_matmul
    from .triton_int8_matmul import int8_matmul
    _missing = None
except ImportError as e:  # triton is an optional dependency (the "gpu" extra)
    _missing = f"triton is not importable ({e})"


def _group_ok(group_size: int | None) -> bool:
    return group_size is None or (group_size >= 16 and group_size & (group_size - 1) == 0)


def supports(x: Tensor, weight, bias: Tensor | None = None) -> str | None:
    if _missing is not None:
        return _missing
    reason = check_dequant_matmul_args(x, weight, bias)
    if reason is not None:
        return reason
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return f"runs on cuda (or cpu under TRITON_INTERPRET=1), activation is on {x.device}"
    if not isinstance(weight, (Int4Weight, Int8Weight)):
        return f"unsupported weight format {type(weight).__name__}"
    if not _group_ok(weight.group_size):
        return f"group size {weight.group_size} is not a power of two >= 16"
    return None


def dequant_matmul(x: Tensor, weight: Int4Weight | Int8Weight, bias: Tensor | None = None,
                   plan: "Plan | None" = None) -> Tensor:
    """(..., K) x (N, K) quantized -> (..., N) in x's dtype; `plan` overrides the kernel choice
    (benchmarks)."""
    k, n = weight.in_features, weight.out_features
    x2 = x.reshape(-1, k)  # (M, K)
    if x2.stride(-1) != 1 or x2.stride(0) < k:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    if x2.shape[0]:
        run = int4_matmul if isinstance(weight, Int4Weight) else int8_matmul
        run(x2, weight, bias, out, plan)
    return out.reshape(*x.shape[:-1], n)


registry.register("dequant_matmul", BACKEND, dequant_matmul, supports=supports,
                  priority={"cuda": 10})
