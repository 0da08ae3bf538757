"""Split-K decode attention over the int8 KV cache (engine.kv_quant.Int8KVCache), byte-bound.

Layout read (per layer, bh = batch * Hkv + KV head, strides of the bh axis passed in):
  k  int8 (S, D)             codes of token s at row s
  v  int8 (S/VT, D, VT)      values transposed in tiles of VT tokens: code of (s, c) at
                             (s // VT, c, s % VT), so a thread's consecutive registers hold
                             consecutive TOKENS of one channel, the k-order of the P.V product
  ks, vs fp16 (S,)           per-token scales
One program = W independent warps (a 3-D tl.dot with the warp as its batch axis): warp w takes
tokens [blk*W*TW + w*TW, +TW) of each iteration and keeps its own running max, sum and output,
so nothing in the loop crosses warps (no barrier, no shared-memory reduction); the W partials
are merged once at the end, then across splits (triton_decode_split.finish). With AHEAD > 0
each iteration also asks L2 for the block AHEAD on (one block: 133 -> 127 us at 128k on H100;
the kernel leaves DRAM half idle, two warps a scheduler waiting on loads).

Arithmetic (fp16 tensor cores; fp32 IEEE dots when the model is fp32):
- keys: codes enter the dot biased, 1152 + s (triton_kv_codes.int8_biased: 0.75 instructions
  a code), against q in fp16; scores = (q16 . (k + 1152) - 1152 * sum(q16)) * k_scale. q is
  scaled by one power of two so its largest entry lies in [2^14, 2^15): fp16 then holds any bf16
  q exactly down to 2^-28 of that entry, and the scale is undone with the key scale;
- values: the per-token scale goes into the probabilities, P = p * v_scale * F, with F a power
  of two per warp and block that puts the block's largest scale in [1, 2) (so P never
  overflows fp16 nor flushes the tokens that matter); codes enter as signed fp16 s
  (triton_kv_codes.int8_signed, 1.25 instructions a code), so the accumulator, which the tensor
  cores truncate, holds only sum(P * s); a change of F rescales the output with alpha. (Biased
  codes here, 1152 + s with 1152 * sum(P) taken off at the end, lost ~ulp(1152 * sum(P)) a
  k-step, one-signed: relative error 2.6e-2 at 128k on an H100, bf16's 2.2e-3.)

Napkin math (Llama-3-8B, 8 KV heads, D = 128, 32k tokens): 8 * 32768 * (128 + 128 + 4) B =
68.2 MB per layer, 22.7 us at 3.0 TB/s. SASS of the loop (sm_90, Triton 3.9, G = 4,
benchmarks/sass_decode_attention.py): 2.56 instructions per cache byte at W = 2, TW = 64 and
3.03 at the default W = 4, TW = 32 (2.45 and 2.87 with biased value codes), against 6.4 for the
earlier kernel (which measured 0.95 TB/s at 32k, issue-bound).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import await_inputs
from .triton_decode_split import (M_INIT, PREFETCH_BLOCKS, finish, merge_warps, online_softmax,
                                  prefetch_positions, split_range)
from .triton_kv_codes import INT8_BIAS, int8_biased, int8_signed


@triton.jit
def pow2_floor(x):
    """(2**floor(log2 x), 2**-floor(log2 x)) of positive normal fp32 x, by exponent bits."""
    bits = x.to(tl.int32, bitcast=True) & 0x7F800000
    return bits.to(tl.float32, bitcast=True), (0x7F000000 - bits).to(tl.float32, bitcast=True)


@triton.jit
def load_group_queries(q_ptr, b, h, stride_qb, stride_qh, qk_scale, G: tl.constexpr,
                       G_PAD: tl.constexpr, D: tl.constexpr, TOP: tl.constexpr):
    """The G query heads of KV head h as (G_PAD, D) fp32 rows (padding rows 0), softmax-scaled
    into the log2 domain, then multiplied by a power of two that puts the largest |q| in
    [TOP, 2 TOP) (exact); returns (scaled q, the factor that undoes it)."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh
                + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0).to(tl.float32)
    q = q * qk_scale
    q_max = tl.max(tl.max(tl.abs(q), axis=1), axis=0)
    q_pow, q_inv = pow2_floor(q_max)
    live_q = q_max > 1e-30
    return q * tl.where(live_q, TOP * q_inv, 1.0), tl.where(live_q, q_pow * (1.0 / TOP), 1.0)


@triton.jit
def _key_codes(x, F16: tl.constexpr, ASM: tl.constexpr):
    """int8 codes s -> s + BIAS in the dot dtype: s + 1152 in fp16, s in fp32 (no bias to take
    off, whose cancellation would cost fp32 ~10 bits)."""
    if F16:
        return int8_biased(x, ASM)
    else:
        return x.to(tl.float32)


@triton.jit
def _value_codes(x, F16: tl.constexpr, ASM: tl.constexpr):
    """int8 codes s -> s in the dot dtype."""
    if F16:
        return int8_signed(x, ASM)
    else:
        return x.to(tl.float32)


@triton.jit
def mma(a, b, acc, F16: tl.constexpr):
    """acc + a @ b on the tensor cores: fp16 operands, or fp32 ones in IEEE precision."""
    if F16:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _prefetch_int8(k_base, v_base, ks_base, vs_base, p0, p1, D: tl.constexpr,
                   SPAN: tl.constexpr):
    prefetch_positions(k_base, p0, p1, D, SPAN)
    prefetch_positions(v_base, p0, p1, D, SPAN)  # VT-position tiles: whole tiles
    prefetch_positions(ks_base, p0, p1, 1, SPAN)
    prefetch_positions(vs_base, p0, p1, 1, SPAN)


@triton.jit
def decode_int8_kernel(
        q_ptr, out_ptr, pos_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, ws_ptr, ml_ptr, lock_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_kh, stride_vh, stride_sh, qk_scale,
        window, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, G_ST: tl.constexpr,
        D: tl.constexpr, TW: tl.constexpr, W: tl.constexpr, VT: tl.constexpr,
        SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr,
        MIN_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr, F16: tl.constexpr,
        ASM: tl.constexpr, AHEAD: tl.constexpr, PDL: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    BLOCK: tl.constexpr = W * TW
    BIAS: tl.constexpr = INT8_BIAS if F16 else 0.0
    b0, b1, lo, n, nsplit = split_range(pos_ptr, window, sp, BLOCK, SPLITS, HAS_WINDOW,
                                          MIN_BLOCKS)
    k_base = k_ptr + bh.to(tl.int64) * stride_kh
    v_base = v_ptr + bh.to(tl.int64) * stride_vh
    s_base = bh.to(tl.int64) * stride_sh
    if ASM:
        if sp < nsplit:
            _prefetch_int8(k_base, v_base, ks_ptr + s_base, vs_ptr + s_base, b0 * BLOCK,
                           tl.minimum(b1 * BLOCK, n), D, PREFETCH_BLOCKS * BLOCK)
    await_inputs(PDL)
    if sp < nsplit:
        b = bh // HKV
        h = bh % HKV
        offs_d = tl.arange(0, D)
        offs_t = tl.arange(0, TW)
        offs_w = tl.arange(0, W)
        q, q_unscale = load_group_queries(q_ptr, b, h, stride_qb, stride_qh, qk_scale, G, G_PAD,
                                          D, 16384.0)
        if F16:
            qc = q.to(tl.float16)
        else:
            qc = q
        k_bias = BIAS * tl.sum(qc.to(tl.float32), axis=1)  # (G_PAD,)
        q3 = tl.broadcast_to(qc[None, :, :], (W, G_PAD, D))
        m = tl.full((W, G_PAD), M_INIT, tl.float32)
        l = tl.zeros((W, G_PAD), tl.float32)
        f = tl.full((W,), 1.0, tl.float32)
        acc = tl.zeros((W, G_PAD, D), tl.float32)
        for blk in range(b0, b1):
            if AHEAD > 0:  # the last block again when none is that far ahead: no branch
                ahead = tl.minimum(blk + AHEAD, b1 - 1) * BLOCK
                _prefetch_int8(k_base, v_base, ks_ptr + s_base, vs_ptr + s_base, ahead,
                               tl.minimum(ahead + BLOCK, n), D, BLOCK)
            start = blk * BLOCK + offs_w * TW  # (W,) first token of each warp
            tok = start[:, None] + offs_t[None, :]  # (W, TW)
            valid = (tok < n) & (tok >= lo)
            # codes are finite whatever they hold: load whole warp tiles (a mask constant along
            # the tile keeps the loads 16-byte vectors) and mask the scores and scales instead
            inside = (start < n)[:, None, None]
            k = tl.load(k_base + tok[:, :, None] * D + offs_d[None, None, :], mask=inside,
                        other=0)  # (W, TW, D)
            v_start = tl.multiple_of((start // VT) * (VT * D) + start % VT, TW)
            vt = tl.load(v_base + v_start[:, None, None] + offs_d[None, :, None] * VT
                         + offs_t[None, None, :], mask=inside, other=0)  # (W, D, TW)
            ks = tl.load(ks_ptr + s_base + tok, mask=valid, other=0.0).to(tl.float32)
            vs = tl.load(vs_ptr + s_base + tok, mask=valid, other=0.0).to(tl.float32)
            raw = mma(q3, tl.trans(_key_codes(k, F16, ASM), 0, 2, 1),
                      tl.zeros((W, G_PAD, TW), tl.float32), F16)  # (W, G_PAD, TW)
            scores = (raw - k_bias[None, :, None]) * (ks * q_unscale)[:, None, :]
            p, alpha, m, l = online_softmax(scores, valid[:, None, :], m, l)
            v_max = tl.max(vs, axis=1)  # (W,)
            f_new = tl.where(v_max > 0, pow2_floor(v_max)[1], f)
            rescale = alpha * (f_new / f)[:, None]  # (W, G_PAD)
            f = f_new
            pv = p * (vs * f[:, None])[:, None, :]
            if F16:
                pv = pv.to(tl.float16)
            acc = mma(pv, tl.trans(_value_codes(vt, F16, ASM), 0, 2, 1),
                      acc * rescale[:, :, None], F16)
        acc = acc / f[:, None, None]
        out, m_all, l_all = merge_warps(acc, m, l)
        finish(out, m_all, l_all, bh, sp, nsplit, nsplit, out_ptr, stride_ob, stride_oh, ws_ptr,
               ml_ptr, lock_ptr, HKV, G, G_PAD, G_ST, D, SPLITS, SPLITS, SPLITS_P2, CHUNK)
