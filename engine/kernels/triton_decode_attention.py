"""Split-K ("flash-decoding") attention of one new token over a dense, int8 or int4 KV cache.

One program handles one (batch, KV head) and one contiguous split of the key blocks, with all
G = H / Hkv query heads of that KV group as the rows of its tiles, so each K/V byte is read once
per step whatever the GQA ratio. The dense kernel pads the G rows to 16 (tensor-core tiles); the
padding costs arithmetic, never bytes. The int8 and int4 kernels live in triton_decode_int8.py
and triton_decode_int4.py (independent warps, biased fp16 codes), the split plan and the merge
in triton_decode_split.py.

The valid length is read on the device from positions[0] (the new token's position, already
written to the cache): n = pos + 1. The split plan is computed from n inside the kernel, so the
grid is static (CUDA-graph safe) yet only the filled part of the cache is read: at 128k
allocated and 1k filled a step reads 1k tokens, not 128k. Programs whose split starts past n
exit at once.

Reduction in the same launch: each program stores its fp32 partial and bumps a per-(batch, KV
head) counter; the last to arrive merges the partials (triton_decode_split.finish). A second
launch per layer would add ~2 us x 32 layers to every token.

Napkin math, Llama-3-8B shape (Hkv = 8, D = 128) at 32k filled, per layer and step:
  bf16 K+V: 8 * 32768 * 128 * 2 * 2 B = 134 MB -> 44 us at 3.0 TB/s
  int8:     8 * 32768 * (128 + 2) * 2 B = 68 MB -> 23 us
  int4:     8 * 32768 * 152 B = 40 MB -> 13 us
Partials: 8 heads * splits(64) * G(4) rows * 128 * 4 B = 1 MB written and read once, ~2.5% of
the int4 bytes at 32k; at 1k context only the few splits that hold keys write any.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import (await_inputs, buffer, interpreting, next_power_of_2, num_sms,
                            pdl_options)
from .triton_decode_int4 import decode_int4_kernel
from .triton_decode_int8 import decode_int8_kernel
from .triton_decode_split import (LOG2E, M_INIT, PREFETCH_BLOCKS, finish, merge_chunk,
                                  online_softmax, prefetch_positions, split_range)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _decode_dense_kernel(
        q_ptr, out_ptr, pos_ptr, k_ptr, v_ptr, ws_ptr, ml_ptr, lock_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_kvh, qk_scale, window,
        HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, G_ST: tl.constexpr,
        D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
        CHUNK: tl.constexpr, MIN_BLOCKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        IEEE: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """Dense cache of one layer: k, v (B*Hkv, S, D) in the model dtype, (batch, head) stride
    stride_kvh. PREFETCH: ask L2 for the first blocks before the PDL wait."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b0, b1, lo, n, nsplit = split_range(pos_ptr, window, sp, BLOCK_N, SPLITS, HAS_WINDOW,
                                          MIN_BLOCKS)
    k_base = k_ptr + bh.to(tl.int64) * stride_kvh
    v_base = v_ptr + bh.to(tl.int64) * stride_kvh
    if PREFETCH:
        if sp < nsplit:
            p0 = b0 * BLOCK_N
            p1 = tl.minimum(b1 * BLOCK_N, n)
            prefetch_positions(k_base, p0, p1, D, PREFETCH_BLOCKS * BLOCK_N)
            prefetch_positions(v_base, p0, p1, D, PREFETCH_BLOCKS * BLOCK_N)
    await_inputs(PDL)
    if sp < nsplit:
        b = bh // HKV
        h = bh % HKV
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=offs_g[:, None] < G, other=0.0)  # (G_PAD, D)
        m = tl.full((G_PAD,), M_INIT, tl.float32)
        l = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D), tl.float32)
        for blk in range(b0, b1):
            offs_s = blk * BLOCK_N + offs_n
            valid = (offs_s < n) & (offs_s >= lo)
            tile = offs_s[:, None] * D + offs_d[None, :]
            k = tl.load(k_base + tile, mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_base + tile, mask=valid[:, None], other=0.0)
            scores = _dot(q, tl.trans(k), IEEE) * qk_scale  # log2-domain softmax scale
            p, alpha, m, l = online_softmax(scores, valid[None, :], m, l)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        finish(acc, m, l, bh, sp, nsplit, nsplit, out_ptr, stride_ob, stride_oh, ws_ptr, ml_ptr,
               lock_ptr, HKV, G, G_PAD, G_ST, D, SPLITS, SPLITS, SPLITS_P2, CHUNK)


# Launch defaults per cache kind. programs_per_sm: how many programs an SM holds at once
# (registers): the split count fills the GPU once at long contexts. min_blocks: blocks of
# positions (block_n dense, num_warps * warp_tokens int8, num_warps * 32 int4) a split takes at
# least, so short contexts run fewer, longer splits (triton_decode_split); 1 = every context
# spread over all splits.
DEFAULTS = {
    # H100, 8 KV heads (bench_attention --sweep, 2026-11-27): 32 splits 65.6 us at 32k and
    # 199 us at 128k (90% of copy) against 74.8 / 216.8 for 64
    "dense": dict(block_n=64, num_warps=4, num_stages=2, programs_per_sm=2, min_blocks=1),
    # 202 registers a thread at 4 warps x 32 positions (Triton 3.6 and 3.9, sm_90): 2 per SM;
    # 64 positions a warp spills 24 bytes under Triton 3.6
    # ahead: L2 prefetch of the block that many on in each iteration; H100 at 32k / 128k, us:
    # 0: 40.3 / 133.2, 1: 39.4 / 127.1, 2: 40.7 / 142.9, 4: 46.9 / 193.4 (the same prefetch
    # made the dense and int4 kernels slower at every distance: 59.7 -> 61.2, 32.1 -> 34.6 us
    # at 32k for one block ahead)
    "int8": dict(warp_tokens=32, num_warps=4, num_stages=2, programs_per_sm=2, min_blocks=1,
                 ahead=1),
    "int4": dict(num_warps=4, num_stages=2, programs_per_sm=2, min_blocks=1),
}


def default_splits(device: torch.device, batch_heads: int, max_blocks: int,
                   programs_per_sm: int = 4) -> int:
    """About enough programs to fill every SM once at long contexts (132 SMs, 8 KV heads, 2
    programs per SM: 32 splits), a power of two (the merge pads the split count to one: 66
    splits took 90.6 us at 32k against 74.8 for 64), never more than the cache has blocks."""
    # 4 SMs under the interpreter: a few splits exercise the merge
    want = max(1, -(-programs_per_sm * num_sms(device, interpreted=4) // batch_heads))
    fit = max(1, min(want, 128, max_blocks))
    return 1 << (fit.bit_length() - 1)


def _workspace(device, bh: int, splits: int, g_st: int, d: int):
    ws = buffer("attn_decode_ws", device, torch.float32, bh * splits * g_st * d)
    ml = buffer("attn_decode_ml", device, torch.float32, bh * 2 * splits * g_st)
    locks = buffer("attn_decode_locks", device, torch.int32, bh, zeroed=True)
    return ws, ml, locks


def _kind(cache) -> str:
    from lowbit.engine.kv_cache import DenseKVCache
    from lowbit.engine.kv_quant import Int4KVCache, Int8KVCache
    for cls, name in ((Int4KVCache, "int4"), (Int8KVCache, "int8"), (DenseKVCache, "dense")):
        if isinstance(cache, cls):
            return name
    raise TypeError(f"no decode attention kernel for {type(cache).__name__}")


def _kv_heads(cache) -> int:
    """Hkv: quantized caches record it; a dense cache's k is (L, B, Hkv, S, D)."""
    return cache.num_kv_heads if hasattr(cache, "num_kv_heads") else cache.k.shape[2]


def launch_plan(q: torch.Tensor, cache, splits: int | None = None,
                **launch) -> tuple[str, dict, int, int]:
    """(cache kind, launch config = DEFAULTS overridden by `launch`, positions per block, split
    count) of decode_attention(q, cache, ..., splits=splits, **launch)."""
    kind = _kind(cache)
    cfg = {**DEFAULTS[kind], **launch}
    if cfg["min_blocks"] < 1:
        raise ValueError(f"min_blocks must be at least 1, got {cfg['min_blocks']}")
    nw = cfg["num_warps"]
    block = {"dense": lambda: cfg["block_n"], "int8": lambda: nw * cfg["warp_tokens"],
             "int4": lambda: nw * 32}[kind]()
    sp = splits or default_splits(q.device, q.shape[0] * _kv_heads(cache),
                                  -(-cache.max_seq // block), cfg["programs_per_sm"])
    return kind, cfg, block, sp


def decode_attention(q: torch.Tensor, cache, layer: int, positions: torch.Tensor, *,
                     splits: int | None = None, **launch) -> torch.Tensor:
    """q (B, H, 1, D) of the token at positions[0] (already written to `cache`) -> (B, H, 1, D).

    Reads keys [0, positions[0]] (within the cache's sliding window, if any) from the cache's own
    storage; nothing is synchronised with the host, so the call can be captured in a CUDA graph.
    `splits` and `launch` override DEFAULTS (benchmarks): num_warps, num_stages, block_n
    (dense: positions per iteration), warp_tokens (int8: positions per warp and iteration, 32
    or 64; int4: always 32, one key group), min_blocks (blocks per split at least)."""
    kind, cfg, _, sp = launch_plan(q, cache, splits, **launch)
    b, h, _, d = q.shape
    hkv = _kv_heads(cache)
    g = h // hkv
    g_st = next_power_of_2(g)
    out = torch.empty((b, h, 1, d), device=q.device, dtype=q.dtype)
    window = cache.sliding_window
    qk_scale = LOG2E / math.sqrt(d)
    ieee = q.dtype == torch.float32
    nw = cfg["num_warps"]
    sp2 = next_power_of_2(sp)
    slots = sp + (kind == "int4")  # the int4 kernel's program of the key group in progress
    ws, ml, locks = _workspace(q.device, b * hkv, slots, g_st, d)
    common = dict(HKV=hkv, G=g, G_ST=g_st, D=d, SPLITS=sp, SPLITS_P2=sp2,
                  CHUNK=merge_chunk(sp2, g_st, d, nw), MIN_BLOCKS=cfg["min_blocks"],
                  HAS_WINDOW=window is not None,
                  num_warps=nw, num_stages=cfg["num_stages"], **pdl_options(q.device))
    grid = (b * hkv, sp)
    win = 0 if window is None else int(window)
    head = (q, out, positions)
    strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1))
    if kind == "int4":
        kp, ks, kz = cache.k_packed[layer], cache.k_scale[layer], cache.k_zero[layer]
        kr, vp = cache.k_residual[layer], cache.v_packed[layer]
        vs, vz = cache.v_scale[layer], cache.v_zero[layer]
        k_sink, v_sink = cache.k_sink[layer], cache.v_sink[layer]
        decode_int4_kernel[(b * hkv, slots)](
            *head, kp, ks, kz, kr, vp, vs, vz, k_sink, v_sink, ws, ml, locks, *strides,
            kp.stride(1), ks.stride(1), kr.stride(1), vp.stride(1), vs.stride(1),
            k_sink.stride(1), qk_scale, win, G_PAD=max(2, g_st), W=nw, GV=vs.shape[-1],
            SINK=cache.sink_tokens, F16=not ieee, ASM=not interpreting(), **common)
    elif kind == "int8":
        k, v, ks, vs = cache.k[layer], cache.v[layer], cache.k_scale[layer], cache.v_scale[layer]
        decode_int8_kernel[grid](
            *head, k, v, ks, vs, ws, ml, locks, *strides, k.stride(1), v.stride(1), ks.stride(1),
            qk_scale, win, G_PAD=max(2, g_st), TW=cfg["warp_tokens"], W=nw, VT=v.shape[-1],
            F16=not ieee, ASM=not interpreting(), AHEAD=0 if interpreting() else cfg["ahead"],
            **common)
    else:
        k, v = cache.k[layer], cache.v[layer]
        _decode_dense_kernel[grid](
            *head, k, v, ws, ml, locks, *strides, k.stride(1), qk_scale, win,
            G_PAD=max(16, g_st), BLOCK_N=cfg["block_n"], IEEE=ieee, PREFETCH=not interpreting(),
            **common)
    return out
