"""Decode GEMV (M <= 2) for int4 and int8 on a load-time "plane" layout: Plan(path="planes").

Why a second layout: on the canonical layout (nibble i of word j is k = 8j + i) each nibble
plane meets x at stride 8, so a thread issues one scalar 2-byte load (+ a bf16->fp32 convert)
per 8 weights it owns per row; on the H100 that kernel ran ~5.8 SASS instructions per weight and
int4 reached the same weights/s as int8 (instruction-bound, benchmarks/NOTES-kernels.md).

Layout (built once per (weight, W, BLOCK_N) and cached in `weight.repacked`):
  P = 32 // bits codes per int32 word (8 for int4, 4 for int8); a chunk is P * W columns of K.
  Within chunk c of row n, word j holds code i (bits [bits*i, bits*(i+1))) = code[n, c*P*W + i*W + j]
  so plane i of a (rows, W) word tile multiplies the CONTIGUOUS activations x[c*P*W + i*W + :W]
  (8-byte vector loads, one convert per x value shared by every row the thread owns).
  Words are stored tile by tile so that one program's chunk is one contiguous block:
      words[t, c, r, j]  int32, (ceil(N / BLOCK_N), C, BLOCK_N, W), row n = t * BLOCK_N + r,
  C = ceil(K / (P * W)); columns past K and rows past N are zero codes (their x is masked to 0,
  their outputs are not stored). Scales and zero points stay (G, N) as in the canonical kernels.
  W divides the group size, so one plane lies in one group: the scale is applied once per
  (row, group) to an exact partial sum of (u - z) * x, not once per weight.

Napkin math, per int4 weight on CUDA cores at M = 1: LOP3 + FADD (the exponent trick, exact
u - z) + FFMA = 3 instructions, plus ~0.13 SHF (high half-word), ~1.25 / R for x (R rows per
thread) and ~3 W / G for scales, zeros and the group flush: ~3.6 at W = 8, R = 4 (was ~5.8).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import Plan, cdiv, finish_tile, int4_plane, int8_plane, split_launch


def plane_words(codes: Tensor, bits: int, words_per_plane: int, block_n: int) -> Tensor:
    """(N, K) uint8 codes (int4 nibbles in [0, 15], or int8 bytes) -> the tiled plane layout of
    the module docstring, flat int32 (ceil(N / block_n) * C * block_n * W,)."""
    n, k = codes.shape
    per = 32 // bits
    w = words_per_plane
    chunks = cdiv(k, per * w)
    n_pad = cdiv(n, block_n) * block_n
    u = torch.zeros(n_pad, chunks * per * w, dtype=torch.uint8, device=codes.device)
    u[:n, :k] = codes
    u = u.view(n_pad, chunks, per, w)  # code i of word j at [.., i, j]
    if bits == 4:
        u = u[:, :, 0::2] | (u[:, :, 1::2] << 4)  # (N', C, 4, W): byte b holds codes 2b, 2b+1
    words = u.permute(0, 1, 3, 2).contiguous().view(torch.int32)  # (N', C, W), little-endian
    tiles = words.view(n_pad // block_n, block_n, chunks, w).permute(0, 2, 1, 3)  # (T, C, BN, W)
    return tiles.contiguous().view(-1)


@triton.jit
def _plane(words, hi, zf, I: tl.constexpr, BITS: tl.constexpr):
    """(BLOCK_N, W) fp32 code I of every word: u - z exactly for int4, q for int8."""
    if BITS == 4:
        return int4_plane(words, hi, zf, I)
    return int8_plane(words, hi, I)


@triton.jit
def _x_plane(x_ptr, offs_k, row, M, K, EVEN_K: tl.constexpr):
    """x[row, offs_k] as fp32, 0 past K or past the last row."""
    if EVEN_K:
        mask = (tl.zeros_like(offs_k) + row) < M
    else:
        mask = ((tl.zeros_like(offs_k) + row) < M) & (offs_k < K)
    return tl.load(x_ptr + offs_k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _planes_gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, stride_xm, stride_om, num_chunks, chunks_per_split,
        BITS: tl.constexpr, W: tl.constexpr, GROUP_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
        SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
        PREFETCH: tl.constexpr):
    """Program (pid_m, n-tile, pid_k): rows [pid_m * BLOCK_M, +BLOCK_M) of x (BLOCK_M in {1, 2})
    times the tile's BLOCK_N weight rows over chunks [pid_k * chunks_per_split, ...).
    GROUP_SIZE 0: one scale per row (int8 per-channel), applied after the K loop."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    PER: tl.constexpr = 32 // BITS  # codes per word = planes per chunk
    CHUNK: tl.constexpr = PER * W
    PLANES_PER_GROUP: tl.constexpr = GROUP_SIZE // W  # >= 1: W divides the group size
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_j = tl.arange(0, W)
    tile = w_ptr + pid_n * num_chunks * BLOCK_N * W
    w_offs = tl.arange(0, BLOCK_N)[:, None] * W + offs_j[None, :]  # (BLOCK_N, W), contiguous
    m0 = pid_m * BLOCK_M
    x0_ptr = x_ptr + m0 * stride_xm
    x1_ptr = x0_ptr + stride_xm

    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, num_chunks)
    acc0 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    part0 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    part1 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
    zf = tl.full((BLOCK_N,), 8.0, tl.float32)
    s = tl.full((BLOCK_N,), 1.0, tl.float32)
    if PREFETCH:
        ahead = tl.load(tile + c_start * BLOCK_N * W + w_offs)  # c_start < c_end always
    for c in range(c_start, c_end):
        if PREFETCH:
            words = ahead
            live = (tl.zeros_like(w_offs) + c + 1) < c_end  # uniform per row: 16-byte loads
            ahead = tl.load(tile + (c + 1) * BLOCK_N * W + w_offs, mask=live, other=0)
        else:
            words = tl.load(tile + c * BLOCK_N * W + w_offs)
        hi = words >> 16
        k0 = c * CHUNK
        for i in tl.static_range(PER):
            offs_k = k0 + i * W + offs_j
            if GROUP_SIZE > 0:
                if i % PLANES_PER_GROUP == 0:
                    g = (k0 + i * W) // GROUP_SIZE
                    if EVEN_K:
                        g_mask = n_mask
                    else:
                        g_mask = n_mask & ((tl.zeros_like(offs_n) + k0 + i * W) < K)
                    s = tl.load(s_ptr + g * N + offs_n, mask=g_mask, other=0.0).to(tl.float32)
                    if BITS == 4 and not SYMMETRIC:
                        zf = tl.load(z_ptr + g * N + offs_n, mask=g_mask, other=0).to(tl.float32)
            w = _plane(words, hi, zf, i, BITS)
            x0 = _x_plane(x0_ptr, offs_k, m0, M, K, EVEN_K)
            if GROUP_SIZE > 0:
                if i % PLANES_PER_GROUP == 0:
                    part0 = w * x0[None, :]
                else:
                    part0 += w * x0[None, :]
            else:
                acc0 += w * x0[None, :]
            if BLOCK_M == 2:
                x1 = _x_plane(x1_ptr, offs_k, m0 + 1, M, K, EVEN_K)
                if GROUP_SIZE > 0:
                    if i % PLANES_PER_GROUP == 0:
                        part1 = w * x1[None, :]
                    else:
                        part1 += w * x1[None, :]
                else:
                    acc1 += w * x1[None, :]
            if GROUP_SIZE > 0:
                if (i % PLANES_PER_GROUP == PLANES_PER_GROUP - 1) or (i == PER - 1):
                    acc0 += part0 * s[:, None]
                    if BLOCK_M == 2:
                        acc1 += part1 * s[:, None]
    out0 = tl.sum(acc0, axis=1)  # (BLOCK_N,): the only cross-thread reduction
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out0 = out0 * s
    cols = tl.arange(0, BLOCK_M)[None, :]
    acc = tl.where(cols == 0, out0[:, None], 0.0)  # (BLOCK_N, BLOCK_M)
    if BLOCK_M == 2:
        out1 = tl.sum(acc1, axis=1)
        if GROUP_SIZE == 0:
            out1 = out1 * s
        acc += tl.where(cols == 1, out1[:, None], 0.0)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    finish_tile(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr,
                pid, pid_k, HAS_BIAS, SPLIT_K)


def words_per_plane(plan: Plan, bits: int, group_size: int) -> int:
    """W = plan.block_k // codes per word, at most the group size (a plane stays in one group)."""
    w = max(4, plan.block_k // (32 // bits))
    return min(w, group_size) if group_size else w


def planes_matmul(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
                  group_size: int, n: int, w: int, bias: Tensor | None, out: Tensor,
                  plan: Plan) -> Tensor:
    """out (M, N) = x (M, K) @ dequant(W).T + bias from `words` (plane_words(..., w,
    plan.block_n)); scales (G, N); zeros (G, N) uint8 or None (symmetric; int8 always);
    group_size 0 means one scale per row."""
    if plan.block_m not in (1, 2):
        raise ValueError(f"the planes path takes 1 or 2 rows per program, not {plan.block_m}")
    m, k = x.shape
    chunks = cdiv(k, (32 // bits) * w)
    tiles, split, per_split, ws, locks = split_launch(plan, m, n, chunks, x.device)
    _planes_gemv_kernel[(tiles, split)](
        x, words, scales, scales if zeros is None else zeros, out if bias is None else bias,
        out, ws, locks, m, n, k, x.stride(0), out.stride(0), chunks, per_split,
        BITS=bits, W=w, GROUP_SIZE=group_size, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        SPLIT_K=split, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None,
        EVEN_K=k % ((32 // bits) * w) == 0, PREFETCH=plan.prefetch,
        num_warps=plan.num_warps, num_stages=plan.num_stages)
    return out
