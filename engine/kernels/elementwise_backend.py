"""The "triton" backend of rms_norm, add_rms_norm, rotary_update (rotary + the cache update: the
dense cache's in the rotary launch, an int8 / int4 cache's at a decode token in its write launch)
and silu_mul: one launch each.

Registered with cuda priority 10 (the torch references are 100). On CPU they run only under the
Triton interpreter (TRITON_INTERPRET=1, tests) and only when forced.

Why: a CUDA-graph decode step of Llama-3-8B at batch 1 spent ~2 ms of its 5.8 ms on tiny
elementwise kernels (~2-3 us each on an H100 even when replayed). Per decoder layer, outside the
matmuls and attention, the torch path launches (bf16, T = 1)
  input norm 8 + rotary 10 (q and k) + dense KV cache writes 2 + residual add 1
  + post-attention norm 8 + silu and mul 2 + residual add 1 = 32;
with these ops (engine/model.py carries each residual add into the next norm)
  add_rms_norm (input norm + the previous layer's MLP residual) 1 + rotary with the dense KV
  cache writes 1 + add_rms_norm (post-attention norm + attention residual) 1 + silu_mul 1 = 4.
A 32-layer token: 32 x 32 + 8 (final norm) = 1032 launches before, 32 x 4 + 1 = 129 after.
Measured (H100, Llama-3-8B shape, benchmarks/trace_decode.py, before the cache write moved into
rotary): 1266 -> 427 kernels a bf16 token, 7.80 -> 6.35 ms of kernel time.

All four are CUDA-graph safe: no host reads; outputs come from torch's caching allocator as the
torch path's do; the grid depends only on shapes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import registry
from .elementwise_reference import (check_rms_norm_args, check_rotary_update_args,
                                    check_silu_mul_args)

BACKEND = "triton"
# One program holds a whole row in registers; beyond this it would spill (Llama 3 405B is 16384).
MAX_HIDDEN = 32768
MAX_HEAD_DIM = 512
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:
    from .triton_common import interpreting
    from .triton_kv_update import rotary_decode_write
    from .triton_rms_norm import add_rms_norm, rms_norm
    from .triton_rotary import rotary
    from .triton_silu_mul import silu_mul
    _missing = None
except ImportError as e:  # triton is an optional dependency (the "gpu" extra)
    _missing = f"triton is not importable ({e})"
    # registered anyway (forcing "triton" then says why it cannot run); supports() stops every call
    rms_norm = add_rms_norm = rotary = silu_mul = None


def _kernel_reason(*tensors: Tensor) -> str | None:
    """Why the kernels cannot run on these tensors' device and dtypes; None when they can."""
    if _missing is not None:
        return _missing
    x = tensors[0]
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return f"runs on cuda (or cpu under TRITON_INTERPRET=1), input is on {x.device}"
    odd = [str(t.dtype) for t in tensors if t.dtype not in DTYPES]
    if odd:
        return f"dtype {', '.join(odd)} is not fp32, fp16 or bf16"
    return None


def supports_rms_norm(x: Tensor, weight: Tensor, eps: float) -> str | None:
    reason = check_rms_norm_args(x, weight) or _kernel_reason(x, weight)
    if reason is None and x.shape[-1] > MAX_HIDDEN:
        return f"hidden size {x.shape[-1]} > {MAX_HIDDEN} does not fit one program's registers"
    return reason


def supports_add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> str | None:
    reason = supports_rms_norm(x, weight, eps) or check_rms_norm_args(x, weight, delta)
    if reason is None and delta.dtype != x.dtype:
        return f"delta {delta.dtype} and x {x.dtype} differ (the sum is stored in x's dtype)"
    return reason


def supports_rotary_update(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache,
                           layer: int, positions: Tensor) -> str | None:
    reason = (check_rotary_update_args(q, k, v, cos, sin, cache, layer, positions)
              or _kernel_reason(q))
    if reason is None and cos.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {cos.shape[-1]} > {MAX_HEAD_DIM}"
    if reason is None and (cos.dtype != q.dtype or sin.dtype != q.dtype):
        # the reference would promote q to cos's dtype; the kernel writes q's
        return f"cos {cos.dtype} and sin {sin.dtype} are not in q's dtype {q.dtype}"
    return reason


def _dense_slots(cache, layer: int) -> tuple[Tensor, Tensor] | None:
    """The dense cache's (B, Hkv, S, D) K and V of `layer` when the rotary kernel can write them;
    quantized caches keep their own writer (engine/kernels/triton_kv_update.py)."""
    from lowbit.engine.kv_cache import DenseKVCache
    if type(cache) is not DenseKVCache:
        return None
    k_slots, v_slots = cache.k[layer], cache.v[layer]
    return (k_slots, v_slots) if k_slots.is_contiguous() and v_slots.is_contiguous() else None


def rotary_update_triton(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache,
                         layer: int, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rotary and the cache update; for a dense cache one launch does both (two index_copy_
    launches a layer fewer: 64 a Llama-3-8B token, ~0.15 ms on an H100), and for an int8 / int4
    cache at one decode token too (its write kernel does the rotary: triton_kv_update)."""
    b, t, _ = v.shape
    v_heads = v.reshape(b, t, -1, cos.shape[-1]).transpose(1, 2)  # (B, Hkv, T, D)
    slots = _dense_slots(cache, layer)
    if slots is not None:
        q, k = rotary(q, k, cos, sin, cache_write=(v, *slots, positions))
        return q, k, v_heads
    fused = rotary_decode_write(q, k, v_heads, cos, sin, cache, layer, positions)
    if fused is None:
        q, k = rotary(q, k, cos, sin)
        cache.update(layer, positions, k, v_heads)
        return q, k, v_heads
    return (*fused, v_heads)


def supports_silu_mul(gate_up: Tensor) -> str | None:
    return check_silu_mul_args(gate_up) or _kernel_reason(gate_up)


def _register():
    ops = {"rms_norm": (rms_norm, supports_rms_norm),
           "add_rms_norm": (add_rms_norm, supports_add_rms_norm),
           "rotary_update": (rotary_update_triton, supports_rotary_update),
           "silu_mul": (silu_mul, supports_silu_mul)}
    for op, (fn, supports) in ops.items():
        registry.register(op, BACKEND, fn, supports=supports, priority={"cuda": 10})


_register()
