"""The specification of the model's elementwise ops, and their CPU path: rms_norm, add_rms_norm,
rotary_update (rotary and the cache write), silu_mul.

Each is the model's torch math verbatim, so CPU results (and the tests against transformers) do
not depend on the registry. On CUDA each is a chain of small kernels (rms_norm 8: cast, pow,
mean, add, rsqrt, mul, cast, mul; rotary 5 per tensor: neg, cat, mul, mul, add), which is what
the fused Triton backend (elementwise_backend.py) replaces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.engine.rope import apply_rotary

from . import registry


def check_rms_norm_args(x: Tensor, weight: Tensor, delta: Tensor | None = None) -> str | None:
    """What every rms_norm / add_rms_norm backend needs; None when the arguments are well formed.
    Any floating dtype is (fp64 included: tests run the model in it); backends narrow that."""
    if not (x.is_floating_point() and weight.is_floating_point()):
        return f"dtypes {x.dtype} (x), {weight.dtype} (weight) are not floating point"
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        return f"weight of shape {tuple(weight.shape)} does not match x of shape {tuple(x.shape)}"
    if weight.device != x.device:
        return f"weight on {weight.device}, x on {x.device}"
    if delta is not None and (delta.shape != x.shape or delta.device != x.device):
        return (f"delta {tuple(delta.shape)} on {delta.device} does not match x "
                f"{tuple(x.shape)} on {x.device}")
    return None


def check_rotary_args(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> str | None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[:2] != k.shape[:2]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} are not (B, T, heads * head_dim)"
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != q.shape[1]:
        return (f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)} are not (T, head_dim), "
                f"T = {q.shape[1]}")
    d = cos.shape[1]
    if d % 2 or q.shape[-1] % d or k.shape[-1] % d:
        return f"head_dim {d} is odd or does not divide q's {q.shape[-1]} and k's {k.shape[-1]}"
    if q.dtype != k.dtype or not q.is_floating_point():
        return f"q {q.dtype} and k {k.dtype} are not one floating dtype"
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        return "q, k, cos and sin are not on one device"
    return None


def check_silu_mul_args(gate_up: Tensor) -> str | None:
    if not gate_up.is_floating_point():
        return f"dtype {gate_up.dtype} is not floating point"
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        return f"last dimension of {tuple(gate_up.shape)} is not 2 * intermediate"
    return None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., N) → weight * x / rms(x); the dtype of weight * x (x's for the model)."""
    # fp32 statistics whatever the activation dtype: a 16-bit mean of squares over 4096
    # channels loses ~3 significant bits.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the norm after it: (s, rms_norm(s)), s = x + delta (torch's promotion:
    x's dtype in the model)."""
    s = x + delta
    return s, rms_norm(s, weight, eps)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q (B, T, H*D), k (B, T, Hkv*D) as projected, cos/sin (T, D) → rotated q (B, H, T, D) and
    k (B, Hkv, T, D), transposed views as attention and the KV cache read them."""
    b, t, _ = q.shape
    d = cos.shape[-1]
    q = q.reshape(b, t, -1, d).transpose(1, 2)  # (B, H, T, D)
    k = k.reshape(b, t, -1, d).transpose(1, 2)  # (B, Hkv, T, D)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def rotary_update(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache, layer: int,
                  positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rotary, then the cache's update(layer, positions, k, v) with the rotated k: q, k, v as
    (B, heads, T, D), the layouts attention reads."""
    q, k = rotary(q, k, cos, sin)
    b, t, _ = v.shape
    v = v.reshape(b, t, -1, cos.shape[-1]).transpose(1, 2)  # (B, Hkv, T, D)
    cache.update(layer, positions, k, v)
    return q, k, v


def check_rotary_update_args(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, cache,
                             layer: int, positions: Tensor) -> str | None:
    if v.shape != k.shape or v.dtype != k.dtype:
        return f"v {tuple(v.shape)} {v.dtype} is not shaped and typed like k {tuple(k.shape)}"
    if positions.shape != (q.shape[1],):
        return f"positions {tuple(positions.shape)} are not one per token ({q.shape[1]})"
    return check_rotary_args(q, k, cos, sin)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up (..., 2*I), gate in the first half, up in the second (engine/fuse.py's stacking
    order) → silu(gate) * up (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# The only path on CPU and the fallback on CUDA: rank 100 leaves room above it.
_EVERYWHERE = {"cpu": 100, "cuda": 100}
registry.register("rms_norm", "reference", rms_norm,
                  supports=lambda x, weight, eps: check_rms_norm_args(x, weight),
                  priority=_EVERYWHERE)
registry.register("add_rms_norm", "reference", add_rms_norm,
                  supports=lambda x, delta, weight, eps: check_rms_norm_args(x, weight, delta),
                  priority=_EVERYWHERE)
registry.register("rotary_update", "reference", rotary_update, supports=check_rotary_update_args,
                  priority=_EVERYWHERE)
registry.register("silu_mul", "reference", silu_mul, supports=check_silu_mul_args,
                  priority=_EVERYWHERE)
