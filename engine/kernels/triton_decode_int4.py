"""Split-K decode attention over the int4 KV cache (engine.kv_quant.Int4KVCache), byte-bound.

Layout read (per layer, bh = batch * Hkv + KV head, strides of the bh axis passed in):
  kp   uint8 (Sk, D/2)       key nibbles, byte j of position s: channel 2j low, 2j+1 high
  ks   fp16, kz uint8 (Gk, D) per-channel scale and integer zero of each 32-position key group
  kr   16-bit (32, D)        the keys of the group in progress (not yet quantized)
  vp   uint8 (Gk, D, 16)     values transposed per 32-position tile, byte j of channel c:
                             position 2j low, 2j+1 high
  vs   fp16, vz uint8 (S, GV) per-position scale and zero of each 32-channel value group
  k_sink, v_sink 16-bit (SINK, D)  positions [0, SINK), read instead of their quantized bytes
The structure is the int8 kernel's (triton_decode_int8.py): W independent warps, warp w takes the
32 positions [blk*W*32 + w*32, +32) of each iteration, one key group, with its own running max,
sum and output; the W partials merge once at the end, then across splits.

Arithmetic (fp16 tensor cores; fp32 IEEE dots, unbiased codes, when the model is fp32):
- keys: a byte gives two fp16 codes, 1024 + u for channel 2j and 64 + u for 2j+1
  (triton_kv_codes.int4_biased, 0.75 instructions a code). The group's per-channel scale goes
  into q, qs = q * s * F (F a power of two putting the group's largest scale in [1, 2), q
  scaled once so its largest entry lies in [2^13, 2^14): qs < 2^15 never overflows fp16), and
  the zero into one bias per query row, scores = qs . codes - sum_c qs_c (bias_c + z_c), both
  sums over the same fp16-rounded qs. Even channels meet the low nibbles and odd ones the high
  nibbles in two dots of D/2, so no nibble is interleaved. The bias is two more dots, qs against
  -(bias_c + z_c) broadcast over the group's 32 positions (exact fp16 integers), whose result
  is the key dots' initial accumulator: 16 HMMA a warp where lane reductions took ~120 SHFL;
- values: the scale is per (position, 32 channels). The rows of the P.V product are (value
  group gv, query row g), GV * G_PAD of them (16 at D = 128, G = 4: the tensor-core tile's M,
  padded anyway): row (gv, g) holds p[g, s] * vs[s, gv] * F, so row block gv is exact for the
  channels of group gv, and the other blocks, wrong for them, are dropped once at the end. The
  low nibbles (even positions) and high nibbles (odd ones) are two dots of K = 16; the score
  dots are taken per parity too (keys of positions start + 2i, then start + 2i + 1, sharing one
  zero-term accumulator), so P comes out already split and needs no even/odd shuffle. Codes
  enter centered, u - 8 (triton_kv_codes.int4_centered, 1.25 instructions a code), and
  sum(P * (z - 8)), weighted by the same fp16 P, is taken off at the end: two more dots of
  K = 16, P against Z (16 positions, 16 columns, column n the zeros z - 8 of value group
  n % GV, int4_zero_centered), from a zero accumulator each iteration, added in fp32; column
  gv of row (gv, g) is its sum, the other columns are dropped at the end. The P.V accumulator,
  which the tensor cores truncate, holds sum(P * (u - 8)), not 1024 * sum(P) (biased codes
  failed the 32k GPU test: relative error 3.9e-2, see triton_kv_codes);
- the group in progress (positions 32 * (n // 32) .. n - 1) reads its 16-bit keys from kr, the
  sink positions their 16-bit keys and values, both as one extra step of warp 0, exactly as the
  reference (attention_quantized_reference.kv_attention_int4) sees them.

Napkin math (Llama-3-8B, 8 KV heads, D = 128, 32k tokens): 8 * 32768 * 152 B = 39.8 MB per layer,
13.3 us at 3.0 TB/s. SASS of the loop (sm_90, Triton 3.9, G = 4, W = 4): 1167 instructions,
7.68 per cache byte (1174 with P split into parities after the score dots and the value zero
term as (P * z) . ones; 9.3 with the key zero term as a lane reduction, 11.8 with the value one
too).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_decode_int8 import load_group_queries, pow2_floor
from .triton_decode_split import M_INIT, finish, merge_warps, online_softmax, split_range
from .triton_kv_codes import (INT4_HIGH_BIAS, INT4_LOW_BIAS, int4_biased, int4_centered,
                              int4_zero_centered)

TOKENS_PER_WARP = tl.constexpr(32)  # one key group (engine.kv_quant.KEY_GROUP)


@triton.jit
def _mma(a, b, acc, F16: tl.constexpr):
    if F16:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _key_codes(x, F16: tl.constexpr, ASM: tl.constexpr):
    """bytes -> (low, high) nibble codes in the dot dtype: biased fp16, or plain fp32 u."""
    if F16:
        return int4_biased(x, ASM)
    else:
        return (x & 15).to(tl.float32), (x >> 4).to(tl.float32)


@triton.jit
def _value_codes(x, F16: tl.constexpr, ASM: tl.constexpr):
    """bytes -> (low, high) nibble codes in the dot dtype: fp16 u - 8, or plain fp32 u."""
    if F16:
        return int4_centered(x, ASM)
    else:
        return (x & 15).to(tl.float32), (x >> 4).to(tl.float32)


@triton.jit
def _zero_codes(z, F16: tl.constexpr, ASM: tl.constexpr):
    """uint8 value zero points -> the dot dtype: fp16 z - 8 (codes enter centred), or fp32 z."""
    if F16:
        return int4_zero_centered(z, ASM)
    else:
        return z.to(tl.float32)


@triton.jit
def _key_half(kp_base, tok, qs_even, qs_odd, bias, unscale, HALF: tl.constexpr,
              F16: tl.constexpr, ASM: tl.constexpr):
    """Scores (W, G_PAD, 16) of the complete-group positions tok (W, 16)."""
    offs_j = tl.arange(0, HALF)
    packed = tl.load(kp_base + tok[:, :, None] * HALF + offs_j[None, None, :])  # (W, 16, D/2)
    k_low, k_high = _key_codes(packed, F16, ASM)
    raw = _mma(qs_even, tl.trans(k_low, 0, 2, 1),
               _mma(qs_odd, tl.trans(k_high, 0, 2, 1), bias, F16), F16)
    return raw * unscale


@triton.jit
def _quantized_scores(kp_base, ks_base, kz_base, start, tok_even, q_even, q_odd, q_unscale,
                      D: tl.constexpr, W: tl.constexpr, G_PAD: tl.constexpr, F16: tl.constexpr,
                      ASM: tl.constexpr):
    """Log2-domain scores of each warp's key group start // 32 (complete) as two (W, G_PAD, 16)
    halves, positions tok_even (start + 2i) and tok_even + 1."""
    HALF: tl.constexpr = D // 2
    H: tl.constexpr = TOKENS_PER_WARP // 2
    offs_d = tl.arange(0, D)
    grp = (start // TOKENS_PER_WARP)[:, None] * D + offs_d[None, :]  # (W, D)
    s = tl.load(ks_base + grp).to(tl.float32)
    z = tl.load(kz_base + grp).to(tl.float32)
    s_max = tl.max(s, axis=1)  # (W,)
    f_pow, f_inv = pow2_floor(s_max)
    f_pow = tl.where(s_max > 0, f_pow, 1.0)
    f_inv = tl.where(s_max > 0, f_inv, 1.0)
    s_even, s_odd = tl.split(tl.reshape(s * f_inv[:, None], (W, HALF, 2)))
    z_even, z_odd = tl.split(tl.reshape(z, (W, HALF, 2)))
    qs_even = q_even[None, :, :] * s_even[:, None, :]  # (W, G_PAD, HALF)
    qs_odd = q_odd[None, :, :] * s_odd[:, None, :]
    low_bias: tl.constexpr = INT4_LOW_BIAS if F16 else 0.0
    high_bias: tl.constexpr = INT4_HIGH_BIAS if F16 else 0.0
    if F16:
        qs_even = qs_even.to(tl.float16)
        qs_odd = qs_odd.to(tl.float16)
    # the zero term is the same at every position: one (W, G_PAD, 16) start serves both halves
    zb_even = tl.broadcast_to(-(z_even + low_bias).to(qs_even.dtype)[:, :, None], (W, HALF, H))
    zb_odd = tl.broadcast_to(-(z_odd + high_bias).to(qs_odd.dtype)[:, :, None], (W, HALF, H))
    bias = _mma(qs_even, zb_even, _mma(qs_odd, zb_odd, tl.zeros((W, G_PAD, H), tl.float32), F16),
                F16)
    unscale = (q_unscale * f_pow)[:, None, None]
    return (_key_half(kp_base, tok_even, qs_even, qs_odd, bias, unscale, HALF, F16, ASM),
            _key_half(kp_base, tok_even + 1, qs_even, qs_odd, bias, unscale, HALF, F16, ASM))


@triton.jit
def _fp16_scores(k_base, tok, valid, qc, q_unscale, D: tl.constexpr, F16: tl.constexpr):
    """Scores (W, G_PAD, 16) against 16-bit keys k_base + tok * D (model dtype), tok (W, 16)."""
    offs_d = tl.arange(0, D)
    k = tl.load(k_base + tok[:, :, None] * D + offs_d[None, None, :], mask=valid[:, :, None],
                other=0.0)  # (W, 16, D)
    dt = k.dtype if F16 else tl.float32
    raw = _mma(qc.to(dt), tl.trans(k.to(dt), 0, 2, 1),
               tl.zeros((qc.shape[0], qc.shape[1], TOKENS_PER_WARP // 2), tl.float32), F16)
    return raw * q_unscale


@triton.jit
def _probabilities(s_even, s_odd, v_even, v_odd, m, l, acc, v_bias, f, vs_even, vs_odd,
                   W: tl.constexpr, GV: tl.constexpr, G_PAD: tl.constexpr, F16: tl.constexpr):
    """Online softmax of one step over its even and odd positions, scores (W, G_PAD, 16) each;
    returns the (W, GV * G_PAD, 16) value-dot rows P * vs * F of each half in the dot dtype, and
    the state with acc, v_bias rescaled to the new max and F. P comes out of the score dots
    already split by position parity, the split the value nibbles need (no shared-memory shuffle).
    vs_even, vs_odd (W, GV, 16): value scales (1 for 16-bit values), 0 where invalid."""
    M: tl.constexpr = GV * G_PAD
    H: tl.constexpr = TOKENS_PER_WARP // 2
    s_even = tl.where(v_even[:, None, :], s_even, float("-inf"))
    s_odd = tl.where(v_odd[:, None, :], s_odd, float("-inf"))
    m_new = tl.maximum(m, tl.maximum(tl.max(s_even, axis=2), tl.max(s_odd, axis=2)))
    alpha = tl.math.exp2(m - m_new)  # (W, G_PAD)
    p_even = tl.math.exp2(s_even - m_new[:, :, None])
    p_odd = tl.math.exp2(s_odd - m_new[:, :, None])
    l = l * alpha + (tl.sum(p_even, axis=2) + tl.sum(p_odd, axis=2))
    m = m_new
    v_max = tl.maximum(tl.max(tl.max(vs_even, axis=2), axis=1), tl.max(tl.max(vs_odd, axis=2),
                                                                        axis=1))  # (W,)
    f_new = tl.where(v_max > 0, pow2_floor(v_max)[1], f)
    rescale = alpha * (f_new / f)[:, None]  # (W, G_PAD)
    f = f_new
    rows = tl.reshape(tl.broadcast_to(rescale[:, None, :], (W, GV, G_PAD)), (W, M))
    pv_even = p_even[:, None, :, :] * (vs_even * f[:, None, None])[:, :, None, :]
    pv_odd = p_odd[:, None, :, :] * (vs_odd * f[:, None, None])[:, :, None, :]
    pv_even = tl.reshape(pv_even, (W, M, H))  # rows (gv, g)
    pv_odd = tl.reshape(pv_odd, (W, M, H))
    if F16:
        pv_even = pv_even.to(tl.float16)
        pv_odd = pv_odd.to(tl.float16)
    return (pv_even, pv_odd, m, l, acc * rows[:, :, None], v_bias * rows[:, :, None], f)


@triton.jit
def _quantized_values(pv_even, pv_odd, acc, v_bias, vp_base, vz_base, start, tok_even, v_even,
                      v_odd, D: tl.constexpr, W: tl.constexpr, GV: tl.constexpr,
                      G_PAD: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
    """acc (W, GV*G_PAD, D) += rows pv_even, pv_odd (W, GV*G_PAD, 16) . int4 values of positions
    tok_even (W, 16) and tok_even + 1 (valid where v_even, v_odd)."""
    offs_d = tl.arange(0, D)
    H: tl.constexpr = TOKENS_PER_WARP // 2
    offs_j = tl.arange(0, H)
    tile = tl.multiple_of((start // TOKENS_PER_WARP) * (D * H), 16)
    packed = tl.load(vp_base + tile[:, None, None] + offs_d[None, :, None] * 16
                     + offs_j[None, None, :])  # (W, D, 16)
    c_even, c_odd = _value_codes(packed, F16, ASM)  # positions 2j, 2j + 1
    # sum(pv * z) per row on the tensor cores: pv . Z, Z (W, 16 positions, 16) holding the
    # zeros of value group n % GV in column n, so column gv of row (gv, g) is its sum (the other
    # columns are dropped at the end); from a zero accumulator: the truncating HMMA sums 32
    # terms, not the warp's whole range
    offs_n = tl.arange(0, 16) % GV
    zo = tok_even[:, :, None] * GV + offs_n[None, None, :]  # (W, 16, 16)
    z_even = _zero_codes(tl.load(vz_base + zo, mask=v_even[:, :, None], other=0), F16, ASM)
    z_odd = _zero_codes(tl.load(vz_base + zo + GV, mask=v_odd[:, :, None], other=0), F16, ASM)
    v_bias += _mma(pv_even, z_even,
                   _mma(pv_odd, z_odd,
                        tl.zeros((W, GV * G_PAD, 16), tl.float32), F16), F16)
    acc = _mma(pv_even, tl.trans(c_even, 0, 2, 1), acc, F16)
    return _mma(pv_odd, tl.trans(c_odd, 0, 2, 1), acc, F16), v_bias


@triton.jit
def _value_scales(vs_base, tok, valid, GV: tl.constexpr):
    """(W, GV, 16) value scales of positions tok (W, 16), 0 where invalid."""
    offs_gv = tl.arange(0, GV)
    return tl.load(vs_base + tok[:, None, :] * GV + offs_gv[None, :, None], mask=valid[:, None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def decode_int4_kernel(
        q_ptr, out_ptr, pos_ptr, kp_ptr, ks_ptr, kz_ptr, kr_ptr, vp_ptr, vs_ptr, vz_ptr,
        ksink_ptr, vsink_ptr, ws_ptr, ml_ptr, lock_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_kp, stride_kg, stride_kr, stride_vp,
        stride_vg, stride_sink, qk_scale, window,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, G_ST: tl.constexpr,
        D: tl.constexpr, W: tl.constexpr, GV: tl.constexpr, SINK: tl.constexpr,
        SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr,
        MIN_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    TW: tl.constexpr = TOKENS_PER_WARP
    BLOCK: tl.constexpr = W * TW
    H: tl.constexpr = TW // 2
    M: tl.constexpr = GV * G_PAD
    b0, b1, lo, n, nsplit = split_range(pos_ptr, window, sp, BLOCK, SPLITS, HAS_WINDOW, MIN_BLOCKS)
    if sp < nsplit:
        b = bh // HKV
        h = bh % HKV
        offs_d = tl.arange(0, D)
        offs_h = tl.arange(0, TW // 2)  # a warp's even positions 2i, odd 2i + 1
        offs_w = tl.arange(0, W)
        qc, q_unscale = load_group_queries(q_ptr, b, h, stride_qb, stride_qh, qk_scale, G,
                                           G_PAD, D, 8192.0)
        q_even, q_odd = tl.split(tl.reshape(qc, (G_PAD, D // 2, 2)))
        q3 = tl.broadcast_to(qc[None, :, :], (W, G_PAD, D))
        m = tl.full((W, G_PAD), M_INIT, tl.float32)
        l = tl.zeros((W, G_PAD), tl.float32)
        acc = tl.zeros((W, M, D), tl.float32)
        v_bias = tl.zeros((W, M, 16), tl.float32)  # sum of P * (zero of group n - offset), row, n
        f = tl.full((W,), 1.0, tl.float32)
        bh64 = bh.to(tl.int64)
        kp_base = kp_ptr + bh64 * stride_kp
        ks_base = ks_ptr + bh64 * stride_kg
        kz_base = kz_ptr + bh64 * stride_kg
        vp_base = vp_ptr + bh64 * stride_vp
        vs_base = vs_ptr + bh64 * stride_vg
        vz_base = vz_ptr + bh64 * stride_vg
        first = offs_w == 0
        if SINK > 0:
            if sp == 0:  # the 16-bit sink positions, by warp 0 of the first split
                sink_end = tl.minimum(n, SINK)
                sink_base = bh64 * stride_sink
                for c in range(0, tl.cdiv(sink_end, TW)):
                    tok = c * TW + 2 * offs_h[None, :] + 0 * offs_w[:, None]  # (W, 16) even
                    v_even = first[:, None] & (tok < sink_end) & (tok >= lo)
                    v_odd = first[:, None] & (tok + 1 < sink_end) & (tok + 1 >= lo)
                    s_even = _fp16_scores(ksink_ptr + sink_base, tok, v_even, q3, q_unscale, D,
                                          F16)
                    s_odd = _fp16_scores(ksink_ptr + sink_base, tok + 1, v_odd, q3, q_unscale, D,
                                         F16)
                    # 16-bit values: no scale
                    ones_even = tl.broadcast_to(tl.where(v_even[:, None, :], 1.0, 0.0), (W, GV, H))
                    ones_odd = tl.broadcast_to(tl.where(v_odd[:, None, :], 1.0, 0.0), (W, GV, H))
                    pv_even, pv_odd, m, l, acc, v_bias, f = _probabilities(
                        s_even, s_odd, v_even, v_odd, m, l, acc, v_bias, f, ones_even, ones_odd,
                        W, GV, G_PAD, F16)
                    v_ptrs = vsink_ptr + sink_base + tok[:, :, None] * D + offs_d[None, None, :]
                    v = tl.load(v_ptrs, mask=v_even[:, :, None], other=0.0)  # (W, 16, D)
                    acc = _mma(pv_even, v.to(pv_even.dtype), acc, F16)
                    v = tl.load(v_ptrs + D, mask=v_odd[:, :, None], other=0.0)
                    acc = _mma(pv_odd, v.to(pv_odd.dtype), acc, F16)
        complete = n // TW * TW  # positions before it: quantized keys, as the newest query sees
        for blk in range(b0, b1):
            start = blk * BLOCK + offs_w * TW  # (W,) first position of each warp
            tok = start[:, None] + 2 * offs_h[None, :]  # (W, 16) even positions
            v_even = (tok < complete) & (tok >= lo) & (tok >= SINK)
            v_odd = (tok + 1 < complete) & (tok + 1 >= lo) & (tok + 1 >= SINK)
            # a warp's key group is complete or wholly past `complete` (both are multiples of
            # 32): clamp the group index into the filled part instead of masking 16-byte loads;
            # its scores are masked
            safe = tl.where(start < complete, start, 0)
            s_even, s_odd = _quantized_scores(kp_base, ks_base, kz_base, safe,
                                              safe[:, None] + 2 * offs_h[None, :], q_even, q_odd,
                                              q_unscale, D, W, G_PAD, F16, ASM)
            pv_even, pv_odd, m, l, acc, v_bias, f = _probabilities(
                s_even, s_odd, v_even, v_odd, m, l, acc, v_bias, f,
                _value_scales(vs_base, tok, v_even, GV), _value_scales(vs_base, tok + 1, v_odd, GV),
                W, GV, G_PAD, F16)
            acc, v_bias = _quantized_values(pv_even, pv_odd, acc, v_bias, vp_base, vz_base, safe,
                                            tok, v_even, v_odd, D, W, GV, G_PAD, F16, ASM)
        if (complete < n) & (complete >= b0 * BLOCK) & (complete < b1 * BLOCK):
            # the group in progress: 16-bit keys from the residual window, by warp 0
            tok = complete + 2 * offs_h[None, :] + 0 * offs_w[:, None]  # (W, 16) even
            v_even = first[:, None] & (tok < n) & (tok >= lo) & (tok >= SINK)
            v_odd = first[:, None] & (tok + 1 < n) & (tok + 1 >= lo) & (tok + 1 >= SINK)
            kr_base = kr_ptr + bh64 * stride_kr - complete * D
            s_even = _fp16_scores(kr_base, tok, v_even, q3, q_unscale, D, F16)
            s_odd = _fp16_scores(kr_base, tok + 1, v_odd, q3, q_unscale, D, F16)
            pv_even, pv_odd, m, l, acc, v_bias, f = _probabilities(
                s_even, s_odd, v_even, v_odd, m, l, acc, v_bias, f,
                _value_scales(vs_base, tok, v_even, GV), _value_scales(vs_base, tok + 1, v_odd, GV),
                W, GV, G_PAD, F16)
            acc, v_bias = _quantized_values(pv_even, pv_odd, acc, v_bias, vp_base, vz_base,
                                            complete + 0 * offs_w, tok, v_even, v_odd, D, W, GV,
                                            G_PAD, F16, ASM)
        # row block gv holds the output of the channels of value group gv
        offs_gv = tl.arange(0, GV)
        own_col = (tl.arange(0, M) // G_PAD)[:, None] == tl.arange(0, 16)[None, :]  # (M, 16)
        z_sum = tl.sum(tl.where(own_col[None, :, :], v_bias, 0.0), axis=2)  # (W, M)
        acc4 = tl.reshape(acc - z_sum[:, :, None], (W, GV, G_PAD, D))
        own = offs_gv[None, :, None, None] == (offs_d // 32)[None, None, None, :]
        out = tl.sum(tl.where(own, acc4, 0.0), axis=1) / f[:, None, None]  # (W, G_PAD, D)
        out, m_all, l_all = merge_warps(out, m, l)
        finish(out, m_all, l_all, bh, sp, nsplit, out_ptr, stride_ob, stride_oh, ws_ptr, ml_ptr,
               lock_ptr, HKV, G, G_PAD, G_ST, D, SPLITS, SPLITS_P2, CHUNK)
