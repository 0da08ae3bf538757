"""Pieces shared by the split-K decode attention kernels (dense, int8, int4): the split plan read
from the device, and the in-launch merge of the splits' partials.

Plan: the blocks [first, last) that hold visible keys go to the splits in runs of
per = max(ceil((last - first) / SPLITS), MIN_BLOCKS) blocks. MIN_BLOCKS = 1 spreads any context
over all SPLITS; a larger MIN_BLOCKS gives short contexts fewer, longer splits (fewer partials to
store and merge: at 1k positions, 64 a block, 32 splits, every one of 16 splits holds one block)
while contexts of at least SPLITS * MIN_BLOCKS blocks keep all SPLITS.

Merge: each program stores its fp32 partial (running max m, running sum l, unnormalised output)
for the G real query rows only, and bumps a per-(batch, KV head) counter; the last program to
arrive merges all partials and writes the output, then resets the counter. The merge loads every
split's (m, l) as one (SPLITS, G_ST) tile and the partial outputs as (CHUNK, G_ST, D) tiles
of a statically unrolled loop, so it costs a few dependent memory round trips, not one per split.
When one split holds every key (nsplit == 1) it writes the output itself: no workspace, no
counter, no merge.

Before the PDL wait each program reads the position (written before the step's first kernel),
plans its split and asks L2 for its first two blocks (prefetch_positions), so their bytes arrive
while it waits for the kernel before and loads its queries. With that and the one-step merge
(merge_chunk), H100, Llama-3-8B shape, µs a layer at 8k / 32k / 128k (bench_attention, before /
after, two alternating runs each): bf16 27.5 / 64.5 / 199.6 -> 21.5 / 59.5 / 194.3, int8 22.9 /
46.8 / 136.4 -> 15.8 / 39.8 / 133.2, int4 22.9 / 36.8 / 102.9 -> 14.7 / 30.9 / 100.6.
Measured on H100 (commit 505e602): the earlier merge walked the splits one load at a time, ~80
dependent L2 round trips at 64 splits, and was most of a ~25 us fixed cost per layer (bf16 at 32k:
72.9 us against 46.6 us of streaming at the 128k rate).

Workspace layouts (fp32): ws (B*Hkv, SLOTS, G_ST, D) partial outputs, ml (B*Hkv, 2, SLOTS,
G_ST) running max then running sum; G_ST = next_power_of_2(G); SLOTS = SPLITS, plus one for the
int4 kernel's program of the key group in progress.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import last_arrival, prefetch_l2, reset_counter

LOG2E = 1.4426950408889634
# blocks of its split a program asks L2 for before the PDL wait: the two the loop's 2-stage
# pipeline loads first
PREFETCH_BLOCKS = tl.constexpr(2)
# finite: exp2(M_INIT - M_INIT) stays 1, never NaN, for rows with no key yet; a constexpr,
# since a jit function may only read globals that are (the interpreter does not check this)
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def split_range(pos_ptr, window, sp, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                HAS_WINDOW: tl.constexpr, MIN_BLOCKS: tl.constexpr):
    """The key blocks [b0, b1) of split `sp`, the visible keys [lo, n) and the number of splits
    that hold any key; every program computes the same plan from positions[0] (split_plan is
    the host's copy)."""
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
def prefetch_positions(base, p0, p1, ROW: tl.constexpr, SPAN: tl.constexpr):
    """Ask L2 for positions [p0, min(p1, p0 + SPAN)) of a position-major array, ROW elements a
    position (a hint before the PDL wait: the first blocks' bytes arrive while the program waits
    for the kernel before and loads its queries): one address a 128-byte line, those past p1
    ask for the first line again."""
    LINE: tl.constexpr = 1024 // base.dtype.element_ty.primitive_bitwidth  # elements in 128 B
    LINES: tl.constexpr = (SPAN * ROW + LINE - 1) // LINE
    offs = tl.arange(0, LINES) * LINE
    prefetch_l2(base + p0 * ROW + tl.where(offs < (p1 - p0) * ROW, offs, 0))


@triton.jit
def online_softmax(scores, valid, m, l):
    """One block of (.., ROWS, COLS) log2-scaled scores, softmax along the last axis ->
    (p, alpha, new max, new sum)."""
    scores = tl.where(valid, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=-1))
    alpha = tl.math.exp2(m - m_new)
    p = tl.math.exp2(scores - tl.expand_dims(m_new, -1))
    return p, alpha, m_new, l * alpha + tl.sum(p, axis=-1)


@triton.jit
def merge_warps(acc, m, l):
    """Partials of W independent streams (W, G_PAD, D), (W, G_PAD) -> one (G_PAD, D), (G_PAD,)."""
    m_all = tl.max(m, axis=0)
    w = tl.math.exp2(m - m_all[None, :])  # (W, G_PAD); 0 for a stream that saw no key
    return tl.sum(acc * w[:, :, None], axis=0), m_all, tl.sum(l * w, axis=0)


@triton.jit
def finish(acc, m, l, bh, slot, splits, programs, out_ptr, stride_ob, stride_oh, ws_ptr, ml_ptr,
           lock_ptr, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, G_ST: tl.constexpr,
           D: tl.constexpr, SPLITS: tl.constexpr, SLOTS: tl.constexpr, SPLITS_P2: tl.constexpr,
           CHUNK: tl.constexpr):
    """Store this program's partial (acc (G_PAD, D), m, l (G_PAD,)) in workspace slot `slot`; the
    last of the `programs` programs of (batch, KV head) `bh` to arrive merges them and writes
    out[b, h*G + g, 0, :] for g < G; a lone program (programs == 1) writes it directly.
    Slots [0, splits) hold the splits' partials; with SLOTS == SPLITS + 1, slot SPLITS is an extra
    program's (the int4 kernel's group in progress), counted in `programs` when it ran.
    SPLITS_P2 = next_power_of_2(SPLITS); CHUNK, a power of two <= SPLITS_P2."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    rows = offs_g < G
    if programs == 1:
        b = bh // HKV
        h = bh % HKV
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # rows >= G: 0, not NaN
        ptrs = out_ptr + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=rows[:, None])
    else:
        _store_and_merge(acc, m, l, bh, slot, splits, programs, out_ptr, stride_ob, stride_oh,
                         ws_ptr, ml_ptr, lock_ptr, HKV, G, G_PAD, G_ST, D, SPLITS, SLOTS,
                         SPLITS_P2, CHUNK)


@triton.jit
def _store_and_merge(acc, m, l, bh, slot, splits, programs, out_ptr, stride_ob, stride_oh, ws_ptr,
                     ml_ptr, lock_ptr, HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                     G_ST: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                     SLOTS: tl.constexpr, SPLITS_P2: tl.constexpr, CHUNK: tl.constexpr):
    """finish's path for programs > 1: the partial to the workspace, the last arrival merges."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    rows = offs_g < G
    ws_bh = ws_ptr + bh * (SLOTS * G_ST * D)
    ml_bh = ml_ptr + bh * (2 * SLOTS * G_ST)
    tl.store(ws_bh + (slot * G_ST + offs_g)[:, None] * D + offs_d[None, :], acc,
             mask=rows[:, None])
    tl.store(ml_bh + slot * G_ST + offs_g, m, mask=rows)
    tl.store(ml_bh + (SLOTS + slot) * G_ST + offs_g, l, mask=rows)
    if last_arrival(lock_ptr + bh, programs):
        offs_r = tl.arange(0, G_ST)
        real = offs_r < G
        if SLOTS > SPLITS:
            # the extra slot's partial, loaded with the splits' so they arrive together
            # (a tensor compare: the interpreter rejects a scalar one inside a mask)
            extra = real & ((offs_r * 0 + programs) > splits)
            m_x = tl.load(ml_bh + SPLITS * G_ST + offs_r, mask=extra, other=M_INIT,
                          cache_modifier=".cg")
            l_x = tl.load(ml_bh + (SLOTS + SPLITS) * G_ST + offs_r, mask=extra, other=0.0,
                          cache_modifier=".cg")
            part_x = tl.load(ws_bh + (SPLITS * G_ST + offs_r)[:, None] * D + offs_d[None, :],
                             mask=extra[:, None], other=0.0, cache_modifier=".cg")
        offs_s = tl.arange(0, SPLITS_P2)
        tile = offs_s[:, None] * G_ST + offs_r[None, :]  # (SPLITS_P2, G_ST)
        live = (offs_s[:, None] < splits) & real[None, :]
        m_s = tl.load(ml_bh + tile, mask=live, other=M_INIT, cache_modifier=".cg")
        l_s = tl.load(ml_bh + SLOTS * G_ST + tile, mask=live, other=0.0, cache_modifier=".cg")
        m_all = tl.max(m_s, axis=0)  # (G_ST,)
        if SLOTS > SPLITS:
            m_all = tl.maximum(m_all, m_x)
        l_all = tl.sum(tl.math.exp2(m_s - m_all[None, :]) * l_s, axis=0)
        total = tl.zeros((G_ST, D), tl.float32)
        if SLOTS > SPLITS:
            w_x = tl.math.exp2(m_x - m_all)
            l_all += w_x * l_x
            total += w_x[:, None] * part_x
        offs_c = tl.arange(0, CHUNK)
        for c0 in tl.static_range(0, SPLITS_P2, CHUNK):
            s = c0 + offs_c
            part_live = (s[:, None] < splits) & real[None, :]  # (CHUNK, G_ST)
            ptrs = ws_bh + ((s[:, None] * G_ST + offs_r[None, :]) * D)[:, :, None] \
                + offs_d[None, None, :]  # (CHUNK, G_ST, D)
            # the partials first: their loads need nothing loaded before, so they are in flight
            # while the chunk's maxima arrive and the weights are computed
            part = tl.load(ptrs, mask=part_live[:, :, None], other=0.0, cache_modifier=".cg")
            m_c = tl.load(ml_bh + s[:, None] * G_ST + offs_r[None, :], mask=part_live,
                          other=M_INIT, cache_modifier=".cg")
            w = tl.math.exp2(m_c - m_all[None, :])  # (CHUNK, G_ST)
            total += tl.sum(w[:, :, None] * part, axis=0)
        reset_counter(lock_ptr + bh)
        b = bh // HKV
        h = bh % HKV
        out = total / tl.where(l_all > 0, l_all, 1.0)[:, None]  # rows >= G: 0, not NaN
        ptrs = out_ptr + b * stride_ob + (h * G + offs_r)[:, None] * stride_oh + offs_d[None, :]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_r[:, None] < G)


def split_plan(n: int, block: int, splits: int, min_blocks: int = 1,
               window: int | None = None) -> tuple[int, int]:
    """split_range's plan on the host for n visible-so-far positions: (blocks per split, splits
    that hold keys)."""
    lo = 0 if window is None else max(n - window, 0)
    span = -(-n // block) - lo // block
    per = max(-(-span // splits), min_blocks)
    return per, -(-span // per)


def merge_chunk(splits_p2: int, g_st: int, d: int, num_warps: int) -> int:
    """Splits merged per unrolled step: up to 128 fp32 registers of partials per thread (the
    loop's registers are free by then). Each step costs a few dependent L2 round trips and the
    barriers of its weights' layout change: with 32 per thread (8 of 32 splits a step at G = 4,
    D = 128, 4 warps) the last arrival's merge took ~7.5 us, with 128 (one step) ~2.5 us
    (globaltimer stamps, int4 cache at 32k, H100), for an attention layer of 33 us."""
    per_step = max(1, 128 * 32 * num_warps // (g_st * d))
    return min(splits_p2, 1 << (per_step.bit_length() - 1))
