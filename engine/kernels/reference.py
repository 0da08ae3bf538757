"""The specification of dequant_matmul: dequantize the whole weight to x's dtype, then F.linear.

Every faster backend is tested against this. It reads the packed weight once and writes (then
reads) an N x K copy in x's dtype, so it moves ~4x (bf16) the bytes of a fused kernel; it is the
fallback on every device, never the fast path on GPU.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lowbit.quant.formats import Int4Weight, Int8Weight

from . import registry

FLOAT_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16")


def check_dequant_matmul_args(x: Tensor, weight: Int4Weight | Int8Weight,
                              bias: Tensor | None) -> str | None:
    """What every dequant_matmul backend needs; None when the arguments are well formed."""
    if str(x.dtype) not in FLOAT_DTYPES:
        return f"activation dtype {x.dtype} is not fp32, fp16 or bf16"
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        return (f"activation shape {tuple(x.shape)} does not end in in_features="
                f"{weight.in_features}")
    if weight.device != x.device:
        return f"weight on {weight.device}, activation on {x.device}"
    if bias is not None and (bias.device != x.device or bias.shape != (weight.out_features,)):
        return f"bias of shape {tuple(bias.shape)} on {bias.device} does not match the layer"
    return None


def dequant_matmul(x: Tensor, weight: Int4Weight | Int8Weight, bias: Tensor | None = None) -> Tensor:
    """(..., K) x (N, K) quantized -> (..., N) in x's dtype."""
    w = weight.dequantize(x.dtype)  # (N, K)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# Last resort everywhere: rank 100 leaves room for any faster backend to sit above it.
registry.register("dequant_matmul", "reference", dequant_matmul,
                  supports=check_dequant_matmul_args, priority={"cpu": 100, "cuda": 100})
