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
  low nibbles (even positions) and high nibbles (odd ones) are two dots of K = 16. Codes enter
  centered, u - 8 (triton_kv_codes.int4_centered, 1.25 instructions a code), and
  sum(P * (z - 8)), weighted by the same fp16 P, is one sum per row and block, taken off at the
  end. That sum is one more dot of K = 32: the products P * (z - 8), rounded once to fp16,
  against ones (N = 16, every column the row's sum; 4 HMMA a warp where lane reductions took
  ~150 SHFL of the loop's 309), from a zero accumulator each iteration, added in fp32. The P.V
  accumulator, which the tensor cores truncate, holds sum(P * (u - 8)), not 1024 * sum(P)
  (biased codes failed the 32k GPU test: relative error 3.9e-2, see triton_kv_codes);
- the group in progress (positions 32 * (n // 32) .. n - 1) reads its 16-bit keys from kr, in
  an extra program beside the splits (grid SPLITS + 1, its partial in workspace slot SPLITS), the
  sink positions their 16-bit keys and values as one extra step of warp 0 of split 0, exactly as
  the reference (attention_quantized_reference.kv_attention_int4) sees them.

Napkin math (Llama-3-8B, 8 KV heads, D = 128, 32k tokens): 8 * 32768 * 152 B = 39.8 MB per layer,
13.3 us at 3.0 TB/s. SASS of the loop (sm_90, Triton 3.9, G = 4, W = 4): 7.7 instructions per
cache byte (9.3 with the key zero term as a lane reduction, 11.8 with the value one too).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import await_inputs
from .triton_decode_int8 import load_group_queries, mma, pow2_floor
from .triton_decode_split import (M_INIT, PREFETCH_BLOCKS, finish, merge_warps, online_softmax,
                                  prefetch_positions, split_range)
from .triton_kv_codes import INT4_CENTER, INT4_HIGH_BIAS, INT4_LOW_BIAS, int4_biased, int4_centered

TOKENS_PER_WARP = tl.constexpr(32)  # one key group (engine.kv_quant.KEY_GROUP)


@triton.jit
def _nibble_codes(x, CENTERED: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
    """bytes -> (low, high) nibble codes in the dot dtype: fp16 u - 8 (CENTERED, values) or
    biased fp16 (keys), or plain fp32 u."""
    if F16:
        if CENTERED:
            return int4_centered(x, ASM)
        else:
            return int4_biased(x, ASM)
    else:
        return (x & 15).to(tl.float32), (x >> 4).to(tl.float32)


@triton.jit
def _quantized_scores(kp_base, ks_base, kz_base, start, offs_t, q_even, q_odd, q_unscale,
                      D: tl.constexpr, W: tl.constexpr, G_PAD: tl.constexpr, F16: tl.constexpr,
                      ASM: tl.constexpr):
    """Log2-domain scores (W, G_PAD, 32) of each warp's key group start // 32 (complete)."""
    HALF: tl.constexpr = D // 2
    offs_j = tl.arange(0, HALF)
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
    zb_even = tl.broadcast_to(-(z_even + low_bias).to(qs_even.dtype)[:, :, None],
                              (W, HALF, TOKENS_PER_WARP))
    zb_odd = tl.broadcast_to(-(z_odd + high_bias).to(qs_odd.dtype)[:, :, None],
                             (W, HALF, TOKENS_PER_WARP))
    bias = mma(qs_even, zb_even, mma(qs_odd, zb_odd,
               tl.zeros((W, G_PAD, TOKENS_PER_WARP), tl.float32), F16), F16)
    tok = start[:, None] + offs_t[None, :]  # (W, 32)
    packed = tl.load(kp_base + tok[:, :, None] * HALF + offs_j[None, None, :])  # (W, 32, D/2)
    k_low, k_high = _nibble_codes(packed, False, F16, ASM)
    raw = mma(qs_even, tl.trans(k_low, 0, 2, 1),
              mma(qs_odd, tl.trans(k_high, 0, 2, 1), bias, F16), F16)
    return raw * (q_unscale * f_pow)[:, None, None]


@triton.jit
def _fp16_scores(k_base, tok, valid, qc, q_unscale, D: tl.constexpr, F16: tl.constexpr):
    """Scores (W, G_PAD, 32) against 16-bit keys k_base + tok * D (model dtype)."""
    offs_d = tl.arange(0, D)
    k = tl.load(k_base + tok[:, :, None] * D + offs_d[None, None, :], mask=valid[:, :, None],
                other=0.0)  # (W, 32, D)
    dt = k.dtype if F16 else tl.float32
    raw = mma(qc.to(dt), tl.trans(k.to(dt), 0, 2, 1),
              tl.zeros((qc.shape[0], qc.shape[1], TOKENS_PER_WARP), tl.float32), F16)
    return raw * q_unscale


@triton.jit
def _probabilities(scores, valid, m, l, acc, v_bias, f, vs, W: tl.constexpr, GV: tl.constexpr,
                   G_PAD: tl.constexpr, F16: tl.constexpr):
    """Online softmax of one step; returns the (W, GV, G_PAD, 32) value-dot rows P * vs * F in
    the dot dtype, and the state with acc, v_bias rescaled to the new max and F.
    vs (W, GV, 32): value scales (1 for 16-bit values), 0 where invalid."""
    p, alpha, m, l = online_softmax(scores, valid[:, None, :], m, l)  # (W, G_PAD, 32)
    v_max = tl.max(tl.max(vs, axis=2), axis=1)  # (W,)
    f_new = tl.where(v_max > 0, pow2_floor(v_max)[1], f)
    rescale = alpha * (f_new / f)[:, None]  # (W, G_PAD)
    f = f_new
    rows = tl.reshape(tl.broadcast_to(rescale[:, None, :], (W, GV, G_PAD)), (W, GV * G_PAD))
    pv = p[:, None, :, :] * (vs * f[:, None, None])[:, :, None, :]  # (W, GV, G_PAD, 32)
    if F16:
        pv = pv.to(tl.float16)
    return pv, m, l, acc * rows[:, :, None], v_bias * rows[:, :, None], f


@triton.jit
def _quantized_values(pv, acc, v_bias, vp_base, vz_base, start, tok, valid, D: tl.constexpr,
                      W: tl.constexpr, GV: tl.constexpr, G_PAD: tl.constexpr,
                      F16: tl.constexpr, ASM: tl.constexpr):
    """acc (W, GV*G_PAD, D) += rows pv (W, GV, G_PAD, 32) . int4 values of positions tok."""
    offs_d = tl.arange(0, D)
    offs_j = tl.arange(0, TOKENS_PER_WARP // 2)
    offs_gv = tl.arange(0, GV)
    M: tl.constexpr = GV * G_PAD
    tile = tl.multiple_of((start // TOKENS_PER_WARP) * (D * TOKENS_PER_WARP // 2), 16)
    packed = tl.load(vp_base + tile[:, None, None] + offs_d[None, :, None] * 16
                     + offs_j[None, None, :])  # (W, D, 16)
    v_even, v_odd = _nibble_codes(packed, True, F16, ASM)  # positions 2j, 2j + 1
    z = tl.load(vz_base + tok[:, None, :] * GV + offs_gv[None, :, None], mask=valid[:, None, :],
                other=0).to(tl.float32)  # (W, GV, 32)
    if F16:
        z -= INT4_CENTER
    # sum(pv * z) per row on the tensor cores: (pv * z) . ones, every column the row's sum (a
    # zero accumulator: the truncating HMMA sums 32 terms, not the warp's whole range)
    pz = tl.reshape(pv * z[:, :, None, :].to(pv.dtype), (W, M, TOKENS_PER_WARP))
    ones = tl.full((W, TOKENS_PER_WARP, 16), 1.0, pv.dtype)
    v_bias += mma(pz, ones, tl.zeros((W, M, 16), tl.float32), F16)
    p_even, p_odd = tl.split(tl.reshape(pv, (W, M, TOKENS_PER_WARP // 2, 2)))
    acc = mma(p_even, tl.trans(v_even, 0, 2, 1), acc, F16)
    return mma(p_odd, tl.trans(v_odd, 0, 2, 1), acc, F16), v_bias


@triton.jit
def _value_scales(vs_base, tok, valid, GV: tl.constexpr):
    offs_gv = tl.arange(0, GV)
    return tl.load(vs_base + tok[:, None, :] * GV + offs_gv[None, :, None], mask=valid[:, None, :],
                   other=0.0).to(tl.float32)  # (W, GV, 32)


@triton.jit
def _prefetch_int4(kp_base, ks_base, kz_base, vp_base, vs_base, vz_base, p0, p1,
                   D: tl.constexpr, GV: tl.constexpr, SPAN: tl.constexpr):
    """Complete key groups only (p1 <= n // 32 * 32): the group in progress has no codes yet."""
    TW: tl.constexpr = TOKENS_PER_WARP
    prefetch_positions(kp_base, p0, p1, D // 2, SPAN)
    prefetch_positions(vp_base, p0, p1, D // 2, SPAN)  # 32-position tiles of D x 16 B
    prefetch_positions(ks_base, p0 // TW, p1 // TW, D, SPAN // TW)
    prefetch_positions(kz_base, p0 // TW, p1 // TW, D, SPAN // TW)
    prefetch_positions(vs_base, p0, p1, GV, SPAN)
    prefetch_positions(vz_base, p0, p1, GV, SPAN)


@triton.jit
def decode_int4_kernel(
        q_ptr, out_ptr, pos_ptr, kp_ptr, ks_ptr, kz_ptr, kr_ptr, vp_ptr, vs_ptr, vz_ptr,
        ksink_ptr, vsink_ptr, ws_ptr, ml_ptr, lock_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_kp, stride_kg, stride_kr, stride_vp,
        stride_vg, stride_sink, qk_scale, window,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, G_ST: tl.constexpr,
        D: tl.constexpr, W: tl.constexpr, GV: tl.constexpr, SINK: tl.constexpr,
        SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr,
        MIN_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr,
        PDL: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    TW: tl.constexpr = TOKENS_PER_WARP
    BLOCK: tl.constexpr = W * TW
    M: tl.constexpr = GV * G_PAD
    b0, b1, lo, n, nsplit = split_range(pos_ptr, window, sp, BLOCK, SPLITS, HAS_WINDOW, MIN_BLOCKS)
    complete = n // TW * TW  # positions before it: quantized keys, as the newest query sees
    # the group in progress (16-bit keys) is the extra program's, sp == SPLITS, beside the splits
    extra = complete < n
    programs = nsplit + extra.to(tl.int32)
    bh64 = bh.to(tl.int64)
    kp_base = kp_ptr + bh64 * stride_kp
    ks_base = ks_ptr + bh64 * stride_kg
    kz_base = kz_ptr + bh64 * stride_kg
    vp_base = vp_ptr + bh64 * stride_vp
    vs_base = vs_ptr + bh64 * stride_vg
    vz_base = vz_ptr + bh64 * stride_vg
    if ASM:
        if sp < nsplit:
            _prefetch_int4(kp_base, ks_base, kz_base, vp_base, vs_base, vz_base, b0 * BLOCK,
                           tl.minimum(b1 * BLOCK, complete), D, GV, PREFETCH_BLOCKS * BLOCK)
    await_inputs(PDL)
    if (sp < nsplit) | ((sp == SPLITS) & extra):
        b = bh // HKV
        h = bh % HKV
        offs_d = tl.arange(0, D)
        offs_t = tl.arange(0, TW)
        offs_w = tl.arange(0, W)
        qc, q_unscale = load_group_queries(q_ptr, b, h, stride_qb, stride_qh, qk_scale, G,
                                           G_PAD, D, 8192.0)
        q_even, q_odd = tl.split(tl.reshape(qc, (G_PAD, D // 2, 2)))
        q3 = tl.broadcast_to(qc[None, :, :], (W, G_PAD, D))
        m = tl.full((W, G_PAD), M_INIT, tl.float32)
        l = tl.zeros((W, G_PAD), tl.float32)
        acc = tl.zeros((W, M, D), tl.float32)
        v_bias = tl.zeros((W, M, 16), tl.float32)  # sum of P * (zero - code offset) per row, x16
        f = tl.full((W,), 1.0, tl.float32)
        first = offs_w == 0
        if sp < nsplit:
            if SINK > 0:
                if sp == 0:  # the 16-bit sink positions, by warp 0 of the first split
                    sink_end = tl.minimum(n, SINK)
                    for c in range(0, tl.cdiv(sink_end, TW)):
                        tok = c * TW + offs_t[None, :] + 0 * offs_w[:, None]  # (W, 32)
                        valid = first[:, None] & (tok < sink_end) & (tok >= lo)
                        sink_base = bh64 * stride_sink
                        scores = _fp16_scores(ksink_ptr + sink_base, tok, valid, q3, q_unscale,
                                              D, F16)
                        ones = tl.where(valid[:, None, :], 1.0, 0.0)  # 16-bit values: no scale
                        ones = tl.broadcast_to(ones, (W, GV, TW))
                        pv, m, l, acc, v_bias, f = _probabilities(scores, valid, m, l, acc,
                                                                  v_bias, f, ones, W, GV, G_PAD,
                                                                  F16)
                        v = tl.load(vsink_ptr + sink_base + tok[:, :, None] * D
                                    + offs_d[None, None, :], mask=valid[:, :, None],
                                    other=0.0)  # (W, 32, D)
                        acc = mma(tl.reshape(pv, (W, M, TW)), v.to(pv.dtype), acc, F16)
            for blk in range(b0, b1):
                start = blk * BLOCK + offs_w * TW  # (W,) first position of each warp
                tok = start[:, None] + offs_t[None, :]  # (W, 32)
                valid = (tok < complete) & (tok >= lo) & (tok >= SINK)
                # a warp's key group is complete or wholly past `complete` (both are multiples
                # of 32): clamp the group index into the filled part instead of masking 16-byte
                # loads; its scores are masked
                safe = tl.where(start < complete, start, 0)
                scores = _quantized_scores(kp_base, ks_base, kz_base, safe, offs_t, q_even,
                                           q_odd, q_unscale, D, W, G_PAD, F16, ASM)
                pv, m, l, acc, v_bias, f = _probabilities(
                    scores, valid, m, l, acc, v_bias, f, _value_scales(vs_base, tok, valid, GV),
                    W, GV, G_PAD, F16)
                acc, v_bias = _quantized_values(pv, acc, v_bias, vp_base, vz_base, safe, tok,
                                                valid, D, W, GV, G_PAD, F16, ASM)
        else:
            # the group in progress: 16-bit keys from the residual window, by warp 0 (the split
            # holding it would otherwise run one step more than the others: +2.6 us a layer)
            tok = complete + offs_t[None, :] + 0 * offs_w[:, None]  # (W, 32)
            valid = first[:, None] & (tok < n) & (tok >= lo) & (tok >= SINK)
            scores = _fp16_scores(kr_ptr + bh64 * stride_kr - complete * D, tok, valid, q3,
                                  q_unscale, D, F16)
            pv, m, l, acc, v_bias, f = _probabilities(
                scores, valid, m, l, acc, v_bias, f, _value_scales(vs_base, tok, valid, GV), W,
                GV, G_PAD, F16)
            acc, v_bias = _quantized_values(pv, acc, v_bias, vp_base, vz_base,
                                            complete + 0 * offs_w, tok, valid, D, W, GV, G_PAD,
                                            F16, ASM)
        # row block gv holds the output of the channels of value group gv
        offs_gv = tl.arange(0, GV)
        acc4 = tl.reshape(acc - tl.max(v_bias, axis=2)[:, :, None], (W, GV, G_PAD, D))
        own = offs_gv[None, :, None, None] == (offs_d // 32)[None, None, None, :]
        out = tl.sum(tl.where(own, acc4, 0.0), axis=1) / f[:, None, None]  # (W, G_PAD, D)
        out, m_all, l_all = merge_warps(out, m, l)
        finish(out, m_all, l_all, bh, sp, nsplit, programs, out_ptr, stride_ob, stride_oh, ws_ptr,
               ml_ptr, lock_ptr, HKV, G, G_PAD, G_ST, D, SPLITS, SPLITS + 1, SPLITS_P2, CHUNK)
