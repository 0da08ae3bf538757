"""Split-K ("flash-decoding") attention of one new token over a dense, int8 or int4 KV cache.

One program handles one (batch, KV head) and one contiguous split of the key blocks, with all
G = H / Hkv query heads of that KV group as the rows of its tiles, so each K/V byte is read once
per step whatever the GQA ratio. The G rows are padded to 16 so the score and value products
run on tensor cores (tl.dot needs M >= 16); the padding costs arithmetic, never bytes.

The valid length is read on the device from positions[0] (the new token's position, already
written to the cache): n = pos + 1. The split plan is computed from n inside the kernel, so the
grid is static (CUDA-graph safe) yet only the filled part of the cache is read: at 128k
allocated and 1k filled a step reads 1k tokens, not 128k. Programs whose split starts past n
exit at once.

Reduction in the same launch: each program stores its fp32 partial (running max, sum, output)
and bumps a per-(batch, KV head) counter; the last to arrive merges the partials in split order
(deterministic), writes the output and resets the counter. A second launch per layer would add
~2 us x 32 layers to every token.

Napkin math, Llama-3-8B shape (Hkv = 8, D = 128) at 32k filled, per layer and step:
  bf16 K+V: 8 * 32768 * 128 * 2 * 2 B = 134 MB -> 44 us at 3.0 TB/s
  int8:     8 * 32768 * (128 + 2) * 2 B = 68 MB -> 23 us
  int4:     8 * 32768 * (64 + 64 + 12 + 3/32*... ) ~ 38 MB -> 13 us
Partials: 8 heads * splits(64) * 16 rows * 128 * 4 B = 4 MB written and read once, ~8% of the
int4 bytes at 32k; at 1k context only the few splits that hold keys write any.

Dequantization happens in registers, shaped so that no nibble is ever interleaved:
- int8: scores = (q . k8) * k_scale[s], values enter as (p * v_scale[s]) . v8;
- int4 keys (per channel over 32-token groups, one group per block): q is scaled by the group's
  scales once, q.k = sum_c (q_c s_c)(u_c - z_c), with low nibbles meeting the even channels and
  high nibbles the odd ones as two dots of D/2; the group in progress (positions from
  32 * (n // 32) on) comes from the 16-bit residual window, exactly as the reference reads it;
- int4 values: (u - z) * s per element, even and odd channels accumulated separately and
  interleaved only when stored.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import buffer

KIND_DENSE, KIND_INT8 = 0, 1
KEY_GROUP = 32  # engine.kv_quant.KEY_GROUP: one int4 key block is one quantization group
LOG2E = 1.4426950408889634
# finite: exp2(M_INIT - M_INIT) stays 1, never NaN, for rows with no key yet; a constexpr,
# since a jit function may only read globals that are (the interpreter does not check this)
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _split_range(pos_ptr, window, sp, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                 MIN_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The key blocks [b0, b1) of split `sp`, the visible keys [lo, n) and the number of splits
    that hold any key; every program computes the same plan from positions[0]."""
    n = tl.load(pos_ptr).to(tl.int32) + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(n - window, 0)
    first = lo // BLOCK_N
    last = (n + BLOCK_N - 1) // BLOCK_N
    per = tl.maximum((last - first + SPLITS - 1) // SPLITS, MIN_BLOCKS)
    nsplit = (last - first + per - 1) // per
    b0 = first + sp * per
    b1 = tl.minimum(b0 + per, last)
    return b0, b1, lo, n, nsplit


@triton.jit
def _online_softmax(scores, valid, m, l):
    """One block of (G_PAD, BLOCK_N) log2-scaled scores -> (p, alpha, new max, new sum)."""
    scores = tl.where(valid[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    alpha = tl.math.exp2(m - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    return p, alpha, m_new, l * alpha + tl.sum(p, axis=1)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _finish(acc, m, l, bh, sp, nsplit, out_ptr, stride_ob, stride_oh, ws_ptr, ml_ptr, lock_ptr,
            HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
            SPLITS: tl.constexpr):
    """Store this split's partial; the last split of (batch, KV head) `bh` to arrive merges all
    of them and writes out[b, h*G + g, 0, :]. Workspace: ws (B*Hkv, SPLITS, G_PAD, D) fp32,
    ml (B*Hkv, SPLITS, 2, G_PAD) fp32 (running max, running sum)."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    tile = offs_g[:, None] * D + offs_d[None, :]
    slot = bh * SPLITS + sp
    tl.store(ws_ptr + slot * G_PAD * D + tile, acc)
    tl.store(ml_ptr + slot * 2 * G_PAD + offs_g, m)
    tl.store(ml_ptr + slot * 2 * G_PAD + G_PAD + offs_g, l)
    tl.debug_barrier()  # every thread's partial is stored before the release below
    arrived = tl.atomic_add(lock_ptr + bh, 1, sem="acq_rel")
    if arrived == nsplit - 1:
        m_all = tl.full((G_PAD,), M_INIT, tl.float32)
        for s in range(0, nsplit):
            m_s = tl.load(ml_ptr + (bh * SPLITS + s) * 2 * G_PAD + offs_g, cache_modifier=".cg")
            m_all = tl.maximum(m_all, m_s)
        total = tl.zeros((G_PAD, D), tl.float32)
        l_all = tl.zeros((G_PAD,), tl.float32)
        for s in range(0, nsplit):
            base = (bh * SPLITS + s) * 2 * G_PAD
            w = tl.math.exp2(tl.load(ml_ptr + base + offs_g, cache_modifier=".cg") - m_all)
            l_all += w * tl.load(ml_ptr + base + G_PAD + offs_g, cache_modifier=".cg")
            part = tl.load(ws_ptr + (bh * SPLITS + s) * G_PAD * D + tile, cache_modifier=".cg")
            total += w[:, None] * part
        tl.atomic_xchg(lock_ptr + bh, 0)
        b = bh // HKV
        h = bh % HKV
        out = total / l_all[:, None]
        ptrs = out_ptr + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_g[:, None] < G)


@triton.jit
def _decode_dense_int8_kernel(
        q_ptr, out_ptr, pos_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, ws_ptr, ml_ptr, lock_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_kvh, stride_sh, qk_scale, window,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, MIN_BLOCKS: tl.constexpr,
        KIND: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """Dense (k, v in the model dtype) or int8 (codes + per-token fp16 scales) caches of one
    layer: k, v (B*Hkv, S, D) with (batch, head) stride stride_kvh; scales (B*Hkv, S)."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b0, b1, lo, n, nsplit = _split_range(pos_ptr, window, sp, BLOCK_N, SPLITS, MIN_BLOCKS,
                                         HAS_WINDOW)
    if sp < nsplit:
        b = bh // HKV
        h = bh % HKV
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        dt = q_ptr.dtype.element_ty
        q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=offs_g[:, None] < G, other=0.0)  # (G_PAD, D)
        m = tl.full((G_PAD,), M_INIT, tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        k_base = k_ptr + bh.to(tl.int64) * stride_kvh
        v_base = v_ptr + bh.to(tl.int64) * stride_kvh
        for blk in range(b0, b1):
            offs_s = blk * BLOCK_N + offs_n
            valid = (offs_s < n) & (offs_s >= lo)
            tile = offs_s[:, None] * D + offs_d[None, :]
            k = tl.load(k_base + tile, mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_base + tile, mask=valid[:, None], other=0.0)
            if KIND == 1:
                ks = tl.load(ks_ptr + bh * stride_sh + offs_s, mask=valid, other=0.0)
                vs = tl.load(vs_ptr + bh * stride_sh + offs_s, mask=valid, other=0.0)
                scores = _dot(q, tl.trans(k.to(dt)), IEEE) * (ks.to(tl.float32) * qk_scale)[None, :]
                p, alpha, m, l = _online_softmax(scores, valid, m, l)
                pv = (p * vs.to(tl.float32)[None, :]).to(dt)
                acc = acc * alpha[:, None] + _dot(pv, v.to(dt), IEEE)
            else:
                scores = _dot(q, tl.trans(k), IEEE) * qk_scale  # log2-domain softmax scale
                p, alpha, m, l = _online_softmax(scores, valid, m, l)
                acc = acc * alpha[:, None] + _dot(p.to(dt), v, IEEE)
        _finish(acc, m, l, bh, sp, nsplit, out_ptr, stride_ob, stride_oh, ws_ptr, ml_ptr, lock_ptr,
                HKV, G, G_PAD, D, SPLITS)


@triton.jit
def _int4_values(vp_base, vs_base, vz_base, offs_s, valid, offs_j, dt,
                 D: tl.constexpr, GV: tl.constexpr, VALUE_GROUP: tl.constexpr):
    """(BLOCK_N, D/2) even and odd channels of the dequantized values of rows offs_s."""
    packed = tl.load(vp_base + offs_s[:, None] * (D // 2) + offs_j[None, :], mask=valid[:, None],
                     other=0)
    grp = offs_s[:, None] * GV + (2 * offs_j // VALUE_GROUP)[None, :]
    s = tl.load(vs_base + grp, mask=valid[:, None], other=0.0).to(tl.float32)
    z = tl.load(vz_base + grp, mask=valid[:, None], other=0).to(tl.float32)
    even = (((packed & 15).to(tl.float32) - z) * s).to(dt)
    odd = (((packed >> 4).to(tl.float32) - z) * s).to(dt)
    return even, odd


@triton.jit
def _decode_int4_kernel(
        q_ptr, out_ptr, pos_ptr, kp_ptr, ks_ptr, kz_ptr, kr_ptr, vp_ptr, vs_ptr, vz_ptr,
        ws_ptr, ml_ptr, lock_ptr, stride_qb, stride_qh, stride_ob, stride_oh,
        stride_kp, stride_kg, stride_kr, stride_vp, stride_vg, qk_scale, window,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        HALF: tl.constexpr, GV: tl.constexpr, VALUE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr, MIN_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        IEEE: tl.constexpr):
    """int4 cache of one layer (engine.kv_quant.Int4KVCache), per (batch, head) bh:
    kp (Sk, D/2) uint8, ks/kz (Gk, D), kr (32, D) 16-bit residual, vp (S, D/2) uint8,
    vs/vz (S, GV); strides are those of the bh axis. Blocks are one 32-token key group."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b0, b1, lo, n, nsplit = _split_range(pos_ptr, window, sp, BLOCK_N, SPLITS, MIN_BLOCKS,
                                         HAS_WINDOW)
    if sp < nsplit:
        b = bh // HKV
        h = bh % HKV
        offs_g = tl.arange(0, G_PAD)
        offs_j = tl.arange(0, HALF)
        offs_n = tl.arange(0, BLOCK_N)
        dt = q_ptr.dtype.element_ty
        bh64 = bh.to(tl.int64)
        q_rows = q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh
        q_mask = offs_g[:, None] < G
        q_even = tl.load(q_rows + 2 * offs_j[None, :], mask=q_mask, other=0.0).to(tl.float32)
        q_odd = tl.load(q_rows + 2 * offs_j[None, :] + 1, mask=q_mask, other=0.0).to(tl.float32)
        q_even = q_even * qk_scale
        q_odd = q_odd * qk_scale
        m = tl.full((G_PAD,), M_INIT, tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc_even = tl.zeros((G_PAD, HALF), tl.float32)
        acc_odd = tl.zeros((G_PAD, HALF), tl.float32)
        kp_base = kp_ptr + bh64 * stride_kp
        ks_base = ks_ptr + bh64 * stride_kg
        kz_base = kz_ptr + bh64 * stride_kg
        vp_base = vp_ptr + bh64 * stride_vp
        vs_base = vs_ptr + bh64 * stride_vg
        vz_base = vz_ptr + bh64 * stride_vg
        complete = n // BLOCK_N  # key groups quantized as the newest query sees them
        for blk in range(b0, tl.minimum(b1, complete)):
            offs_s = blk * BLOCK_N + offs_n
            valid = offs_s >= lo
            packed = tl.load(kp_base + offs_s[:, None] * HALF + offs_j[None, :])  # (32, D/2)
            s_even = tl.load(ks_base + blk * D + 2 * offs_j).to(tl.float32)
            s_odd = tl.load(ks_base + blk * D + 2 * offs_j + 1).to(tl.float32)
            z_even = tl.load(kz_base + blk * D + 2 * offs_j).to(tl.float32)
            z_odd = tl.load(kz_base + blk * D + 2 * offs_j + 1).to(tl.float32)
            k_even = ((packed & 15).to(tl.float32) - z_even[None, :]).to(dt)  # exact integers
            k_odd = ((packed >> 4).to(tl.float32) - z_odd[None, :]).to(dt)
            scores = _dot((q_even * s_even[None, :]).to(dt), tl.trans(k_even), IEEE)
            scores += _dot((q_odd * s_odd[None, :]).to(dt), tl.trans(k_odd), IEEE)
            p, alpha, m, l = _online_softmax(scores, valid, m, l)
            v_even, v_odd = _int4_values(vp_base, vs_base, vz_base, offs_s, valid, offs_j, dt,
                                         D, GV, VALUE_GROUP)
            pd = p.to(dt)
            acc_even = acc_even * alpha[:, None] + _dot(pd, v_even, IEEE)
            acc_odd = acc_odd * alpha[:, None] + _dot(pd, v_odd, IEEE)
        if (complete < b1) & (complete >= b0):  # the group in progress, from the residual window
            offs_s = complete * BLOCK_N + offs_n
            valid = (offs_s < n) & (offs_s >= lo)
            res = kr_ptr + bh64 * stride_kr + offs_n[:, None] * D + 2 * offs_j[None, :]
            k_even = tl.load(res, mask=valid[:, None], other=0.0)
            k_odd = tl.load(res + 1, mask=valid[:, None], other=0.0)
            scores = _dot(q_even.to(dt), tl.trans(k_even.to(dt)), IEEE)
            scores += _dot(q_odd.to(dt), tl.trans(k_odd.to(dt)), IEEE)
            p, alpha, m, l = _online_softmax(scores, valid, m, l)
            v_even, v_odd = _int4_values(vp_base, vs_base, vz_base, offs_s, valid, offs_j, dt,
                                         D, GV, VALUE_GROUP)
            pd = p.to(dt)
            acc_even = acc_even * alpha[:, None] + _dot(pd, v_even, IEEE)
            acc_odd = acc_odd * alpha[:, None] + _dot(pd, v_odd, IEEE)
        acc = tl.reshape(tl.join(acc_even, acc_odd), (G_PAD, D))  # channel 2j, 2j+1 adjacent
        _finish(acc, m, l, bh, sp, nsplit, out_ptr, stride_ob, stride_oh, ws_ptr, ml_ptr, lock_ptr,
                HKV, G, G_PAD, D, SPLITS)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(device: torch.device, batch_heads: int, max_blocks: int) -> int:
    """Enough programs for ~4 per SM at long contexts (132 SMs, 8 KV heads: 64 splits), never
    more splits than the cache has blocks."""
    want = max(1, -(-4 * _num_sms(device) // batch_heads))
    return max(1, min(want, 64, max_blocks))


def _g_pad(g: int) -> int:
    return max(16, triton.next_power_of_2(g))


def _workspace(device, bh: int, splits: int, g_pad: int, d: int):
    ws = buffer("attn_decode_ws", device, torch.float32, bh * splits * g_pad * d)
    ml = buffer("attn_decode_ml", device, torch.float32, bh * splits * 2 * g_pad)
    locks = buffer("attn_decode_locks", device, torch.int32, bh, zeroed=True)
    return ws, ml, locks


def decode_attention(q: torch.Tensor, cache, layer: int, positions: torch.Tensor, *,
                     splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                     num_stages: int = 2) -> torch.Tensor:
    """q (B, H, 1, D) of the token at positions[0] (already written to `cache`) -> (B, H, 1, D).

    Reads keys [0, positions[0]] (within the cache's sliding window, if any) from the cache's own
    storage; nothing is synchronised with the host, so the call can be captured in a CUDA graph.
    `splits`, `block_n` (dense/int8; int4 blocks are its 32-token key groups), `num_warps`,
    `num_stages` override the launch (benchmarks)."""
    from lowbit.engine.kv_cache import DenseKVCache
    from lowbit.engine.kv_quant import VALUE_GROUP, Int4KVCache, Int8KVCache

    b, h, _, d = q.shape
    hkv = cache.num_kv_heads if hasattr(cache, "num_kv_heads") else cache.k.shape[2]
    g = h // hkv
    g_pad = _g_pad(g)
    out = torch.empty((b, h, 1, d), device=q.device, dtype=q.dtype)
    window = cache.sliding_window
    qk_scale = LOG2E / math.sqrt(d)
    ieee = q.dtype == torch.float32
    bn = KEY_GROUP if isinstance(cache, Int4KVCache) else block_n
    max_blocks = -(-cache.max_seq // bn)
    sp = splits or default_splits(q.device, b * hkv, max_blocks)
    ws, ml, locks = _workspace(q.device, b * hkv, sp, g_pad, d)
    common = dict(HKV=hkv, G=g, G_PAD=g_pad, D=d, SPLITS=sp, MIN_BLOCKS=1,
                  HAS_WINDOW=window is not None, IEEE=ieee, num_warps=num_warps,
                  num_stages=num_stages)
    grid = (b * hkv, sp)
    win = 0 if window is None else int(window)
    if isinstance(cache, Int4KVCache):
        kp, ks, kz = cache.k_packed[layer], cache.k_scale[layer], cache.k_zero[layer]
        kr, vp = cache.k_residual[layer], cache.v_packed[layer]
        vs, vz = cache.v_scale[layer], cache.v_zero[layer]
        _decode_int4_kernel[grid](
            q, out, positions, kp, ks, kz, kr, vp, vs, vz, ws, ml, locks,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kp.stride(1), ks.stride(1), kr.stride(1), vp.stride(1), vs.stride(1), qk_scale, win,
            HALF=d // 2, GV=vs.shape[-1], VALUE_GROUP=VALUE_GROUP, BLOCK_N=KEY_GROUP, **common)
        return out
    if isinstance(cache, Int8KVCache):
        k, v, ks, vs, kind = (cache.k[layer], cache.v[layer], cache.k_scale[layer],
                              cache.v_scale[layer], KIND_INT8)
    elif isinstance(cache, DenseKVCache):
        k, v = cache.k[layer], cache.v[layer]
        ks, vs, kind = k, v, KIND_DENSE  # unused scale pointers
    else:
        raise TypeError(f"no decode attention kernel for {type(cache).__name__}")
    _decode_dense_int8_kernel[grid](
        q, out, positions, k, v, ks, vs, ws, ml, locks,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k.stride(1),
        ks.stride(1) if kind == KIND_INT8 else 0, qk_scale, win,
        BLOCK_N=block_n, KIND=kind, **common)
    return out
