"""Rotate-half RoPE of q and k in one Triton launch.

Layouts in: q (B, T, H*D) and k (B, T, Hkv*D) exactly as the (fused) qkv projection returns them:
unit stride inside a row, any batch and token strides (they are column slices of one (B, T,
(H+2*Hkv)*D) output); cos, sin (T, D) from engine.rope.Rotary. Layouts out: new contiguous
(B, T, H, D) and (B, T, Hkv, D) buffers, returned as their (B, H, T, D) and (B, Hkv, T, D)
transposes, the shapes attention and KVCache.update take (at T = 1 those are contiguous).

One program per token row rotates all its heads, q's as one (H, D/2) tile and k's as one
(Hkv, D/2) tile, reading that row's cos and sin once: out[:D/2] = x1*cos1 - x2*sin1,
out[D/2:] = x2*cos2 + x1*sin2 (x1, x2 the halves of a head), in fp32, rounded once to the model
dtype. The reference rounds three times in 16-bit (x*cos, rotate_half(x)*sin, their sum), so
bf16 results differ from it by up to ~1 bf16 ulp.

Launches: the reference is 5 kernels per tensor (neg, cat, mul, mul, add), 10 for q and k; this
is 1. Bytes at Llama-3-8B decode (H = 32, Hkv = 8, D = 128, bf16, one row): 10 KB in, 10 KB out,
one program over 4 warps (16 values of each q half a thread); a prefill of 512 tokens, 512
programs.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .triton_common import await_inputs, checked_out, next_power_of_2, pdl_options


@triton.jit
def _rotate_heads(src, dst, n_heads, c1, c2, s1, s2, stride_dh, HALF: tl.constexpr,
                  HEADS_P: tl.constexpr, BLOCK: tl.constexpr):
    """Rotate n_heads consecutive heads of 2*HALF values at src into dst + head * stride_dh;
    c1.. are (1, BLOCK)."""
    heads = tl.arange(0, HEADS_P)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (heads < n_heads) & (cols < HALF)
    offs = heads * (2 * HALF) + cols  # (HEADS_P, BLOCK): first halves
    out = heads * stride_dh + cols
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    dt = dst.dtype.element_ty
    tl.store(dst + out, (x1 * c1 - x2 * s1).to(dt), mask=mask)
    tl.store(dst + HALF + out, (x2 * c2 + x1 * s2).to(dt), mask=mask)


@triton.jit
def _copy_heads_to_cache(src, dst, n_heads, stride_dh, HALF: tl.constexpr,
                         HEADS_P: tl.constexpr, BLOCK: tl.constexpr):
    """n_heads heads of 2*HALF contiguous values at src to dst + head * stride_dh."""
    heads = tl.arange(0, HEADS_P)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (heads < n_heads) & (cols < HALF)
    for part in tl.static_range(2):
        x = tl.load(src + heads * (2 * HALF) + part * HALF + cols, mask=mask)
        tl.store(dst + heads * stride_dh + part * HALF + cols, x.to(dst.dtype.element_ty),
                 mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, H, HKV,
                   stride_qb, stride_qt, stride_kb, stride_kt, stride_ct,
                   v_ptr, stride_vb, stride_vt, pos_ptr, kc_ptr, vc_ptr, stride_cb, stride_ch,
                   HALF: tl.constexpr, H_P: tl.constexpr, HKV_P: tl.constexpr,
                   BLOCK: tl.constexpr, WRITE_CACHE: tl.constexpr, PDL: tl.constexpr):
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    b = row // T
    t = row % T
    cols = tl.arange(0, BLOCK)[None, :]
    mask = cols < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + cols, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_ct + cols, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * stride_qb + t * stride_qt, qo_ptr + row * H * (2 * HALF), H,
                  c1, c2, s1, s2, 2 * HALF, HALF, H_P, BLOCK)
    k_src = k_ptr + b * stride_kb + t * stride_kt
    _rotate_heads(k_src, ko_ptr + row * HKV * (2 * HALF), HKV, c1, c2, s1, s2, 2 * HALF,
                  HALF, HKV_P, BLOCK)
    if WRITE_CACHE:
        # k rotated a second time (from the same loads, no cross-thread read-back) and the raw v
        # go to the cache's (B, Hkv, S, D) slots at the token's position, read on the device
        pos = tl.load(pos_ptr + t).to(tl.int64)
        slot = b * stride_cb + pos * (2 * HALF)
        _rotate_heads(k_src, kc_ptr + slot, HKV, c1, c2, s1, s2, stride_ch, HALF, HKV_P, BLOCK)
        _copy_heads_to_cache(v_ptr + b * stride_vb + t * stride_vt, vc_ptr + slot, HKV,
                             stride_ch, HALF, HKV_P, BLOCK)


def _num_warps(q_tile: int) -> int:
    # Llama-3-8B's q tile is 32 x 64: 4 warps hold 16 values a thread
    return 1 if q_tile <= 256 else 2 if q_tile <= 1024 else 4 if q_tile <= 4096 else 8


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
           out: tuple[Tensor, Tensor] | None = None,
           cache_write: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
           ) -> tuple[Tensor, Tensor]:
    """q (B, T, H*D), k (B, T, Hkv*D), cos/sin (T, D) → q (B, H, T, D), k (B, Hkv, T, D), the
    transposes of (B, T, H, D) / (B, T, Hkv, D) buffers (`out`, if given, is those buffers).

    cache_write = (v (B, T, Hkv*D), k_cache, v_cache (B, Hkv, S, D) contiguous, positions (T,))
    also stores the rotated k and v at the positions, in the same launch (a dense cache's update:
    two index_copy_ launches a layer fewer)."""
    b, t, _ = q.shape
    d = cos.shape[-1]
    h, hkv = q.shape[-1] // d, k.shape[-1] // d
    q, k = _unit_stride(q), _unit_stride(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = out if out is not None else (None, None)
    q_out = checked_out(q_out, (b, t, h, d), q.dtype, q.device)
    k_out = checked_out(k_out, (b, t, hkv, d), k.dtype, k.device)
    if cache_write is not None:
        v, k_cache, v_cache, positions = cache_write
        v = _unit_stride(v)
        cache_args = (v, v.stride(0), v.stride(1), positions, k_cache, v_cache,
                      k_cache.stride(0), k_cache.stride(1))
    else:
        cache_args = (q, 0, 0, q, q, q, 0, 0)  # never read: WRITE_CACHE is off
    if b * t:
        half, h_p = d // 2, next_power_of_2(h)
        block = next_power_of_2(half)
        _rotary_kernel[(b * t,)](
            q, k, cos, sin, q_out, k_out, t, h, hkv, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), cos.stride(0), *cache_args, HALF=half, H_P=h_p,
            HKV_P=next_power_of_2(hkv), BLOCK=block, WRITE_CACHE=cache_write is not None,
            num_warps=_num_warps(h_p * block), **pdl_options(q.device))
    return q_out.transpose(1, 2), k_out.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
