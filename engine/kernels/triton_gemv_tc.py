"""Decode matmul (M <= 16) for int4 and int8 on the tensor cores: Plan(path="tc").

out (M, N) = x (M, K) @ dequant(W).T, read straight from the canonical bytes (no repack):
int4 qweight (N, K/2) uint8, byte j = u[2j] | u[2j + 1] << 4; int8 qweight (N, K) viewed as
uint8. Per K-chunk of BLOCK_K columns (within one scale group) a program of BLOCK_N weight rows:
  - Triton streams the chunk's bytes through shared memory with cp.async (num_stages deep) and
    loads them into the registers of the MMA's A operand (mma.sync with 1-2 warps, wgmma with 4);
  - bytes become biased 16-bit codes, BIAS + nibble (triton_weight_codes.nibble_codes, ~1
    instruction a code); int4: the low nibbles (even k) meet x[:, 0::2], the high ones x[:, 1::2];
    int8 (s + 128 = 16 h + l): both meet x, the high nibbles' dot weighted 16 in fp32;
  - part (BLOCK_N, BLOCK_M) = those dots from a zero accumulator; the chunk's true sum is
    part - (BIAS + z) * sum(x) for int4 (z the row's zero, 8 when symmetric), and
    part - (BIAS + 16 BIAS + 128) * sum(x) for int8, taken in fp32 and scaled by the group's scale.
BLOCK_M is 8 or 16, the MMA's N: one activation row costs 8x its tensor-core work, 8 x 0.44 =
3.5 GFLOP a Llama-3-8B layer, ~4 us of an H100's 990 dense TFLOP/s beside ~37 us of bytes.

Why biased codes are exact enough: a chunk's dot sums at most BLOCK_K products (BIAS + u) x,
each exact in fp32 (8 x 8 significant bits); the H100's tensor cores truncate each k-step's
terms below the largest one's exponent (tests/engine/kernels/tensor_core_rounding.py), which
with BIAS = 128 and |u - z| ~ 4.6 loses ~2^-23 x 30 of the signal a step, ~8 steps a chunk:
~3e-5, against bf16's 2^-9 output rounding. The fp32 subtraction cancels ~5 bits more. Each
chunk starts from zero, so the loss does not grow with K.

Instructions a code (offline SASS, sm_90, Triton 3.9, int4, BLOCK_K 128, BLOCK_M 8): ~2.7 with
4 warps of wgmma on 128 rows (LOP3 0.5, LDS 0.37, PRMT 0.31, SHF 0.25, the rest loop and
epilogue), ~4.9 with 2 warps of mma.sync on 32 rows (the register shuffles of its operands),
against ~5.5 for the CUDA-core GEMV (triton_int4_matmul._gemv_chunk). Yet the 2-warp tiles are
the faster (H100: 11.5 against 13.4 us on a 4096x4096 layer at M=1), and neither reaches the
~2.2 TB/s a Triton kernel streaming the same tiles without arithmetic gets
(benchmarks/bench_tile_stream.py): instructions are not what bounds them
(benchmarks/NOTES-kernels.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_common import (Plan, await_inputs, cdiv, finish_tile, interpreting,
                            next_power_of_2, pdl_options, prefetch_l1, split_launch)
from .triton_weight_codes import code_bias, nibble_codes


@triton.jit
def _chunk_dot(q, x, BITS: tl.constexpr, BIAS: tl.constexpr, ASM: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_M) fp32 sum over the chunk of codes (BIAS + nibble) times x, weighted so
    that it equals sum(byte value * x) + BIAS-only terms; q (BLOCK_N, BYTES) uint8 and x
    (BLOCK_M, BLOCK_K) in the dot dtype."""
    low, high = nibble_codes(q, x, BIAS, BITS == 8, ASM)
    if BITS == 4:
        x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        part = tl.dot(low, tl.trans(x_even), input_precision=DOT_PRECISION)
        return tl.dot(high, tl.trans(x_odd), part, input_precision=DOT_PRECISION)
    else:
        # the high nibbles weigh 16: their dot scaled in fp32 (16 x could overflow fp16)
        part = tl.dot(high, tl.trans(x), input_precision=DOT_PRECISION) * 16.0
        return tl.dot(low, tl.trans(x), part, input_precision=DOT_PRECISION)


@triton.jit
def _tc_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
               M, N, K, KB, stride_xm, stride_qn, stride_om, chunks_per_split,
               BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
               SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
               BIAS: tl.constexpr, ASM: tl.constexpr, DOT_PRECISION: tl.constexpr,
               PREFETCH_GROUPS: tl.constexpr, PDL: tl.constexpr):
    """Program (tile, pid_k): out[m-tile, n-tile] over K-chunks [pid_k * chunks_per_split, ...).
    s (G, N) scales, z (G, N) uint8 zeros (int4 asymmetric); GROUP_SIZE 0: one scale per row.
    PREFETCH_GROUPS > 0: L1 is asked for the lines of the first that many groups' scales and zeros
    of the program's K range before the PDL wait (weights only), so the loop's loads hit L1."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    BYTES: tl.constexpr = BLOCK_K * BITS // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BYTES)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    q_ptrs = q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :]  # (BLOCK_N, BYTES)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    # int8: low (BIAS + l) + 16 (BIAS + h) = 17 BIAS + s + 128
    BYTE_BIAS: tl.constexpr = 17.0 * BIAS + 128.0 if BITS == 8 else BIAS
    ZERO_OFFSET: tl.constexpr = BYTE_BIAS if BITS == 8 else BIAS + 8.0  # symmetric int4: z = 8

    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, tl.cdiv(K, BLOCK_K))
    if PREFETCH_GROUPS > 0:
        # the loop's scale and zero loads are consumed at once: ncu (H100, 14336x4096 at M=1) put
        # 30% of the warp-stall samples on them. With their lines asked for here (the first line
        # of each group's row tile: all of it up to 64 rows) a layer took 90.1 us, not 91.0;
        # loading them into registers before the loop instead cost a cross-thread select per
        # chunk (37.7 -> 108 us on gate/up)
        g_last = tl.cdiv(K, GROUP_SIZE) - 1
        g_lines = tl.minimum(c_start * BLOCK_K // GROUP_SIZE + tl.arange(0, PREFETCH_GROUPS),
                             g_last) * N + pid_n * BLOCK_N
        prefetch_l1(s_ptr + g_lines)
        if not SYMMETRIC:
            prefetch_l1(z_ptr + g_lines)
    await_inputs(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    x_total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c in range(c_start, c_end):
        k0 = c * BLOCK_K
        if EVEN_K:
            q = tl.load(q_ptrs + c * BYTES, mask=n_mask[:, None], other=0)
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        else:  # past K: bytes give codes of BIAS, x gives 0, so they add nothing
            q = tl.load(q_ptrs + c * BYTES,
                        mask=n_mask[:, None] & (c * BYTES + offs_b < KB)[None, :], other=0)
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        part = _chunk_dot(q, x, BITS, BIAS, ASM, DOT_PRECISION)
        x_sum = tl.sum(x.to(tl.float32), axis=1)  # (BLOCK_M,)
        if GROUP_SIZE == 0:
            acc += part
            x_total += x_sum
        else:
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if SYMMETRIC:
                offset = tl.full((BLOCK_N,), ZERO_OFFSET, tl.float32)
            else:
                offset = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32) + BIAS
            acc += (part - offset[:, None] * x_sum[None, :]) * s[:, None]
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = (acc - BYTE_BIAS * x_total[None, :]) * s[:, None]
    finish_tile(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr,
                pid, pid_k, HAS_BIAS, SPLIT_K)


def spanned_groups(chunks_per_split: int, block_k: int, group_size: int) -> int:
    """The power of two covering the scale groups a program of `chunks_per_split` K-chunks can
    touch (one more when a group holds several chunks: the range may start mid-group); 0 with
    one scale per row."""
    if not group_size:
        return 0
    return next_power_of_2(cdiv(chunks_per_split * block_k, group_size) + (block_k < group_size))


def tc_matmul(x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int,
              group_size: int, n: int, bias: Tensor | None, out: Tensor, plan: Plan) -> Tensor:
    """out (M, N) = x (M, K) @ dequant(W).T + bias on Plan(path="tc").

    codes   uint8 (N, KB): int4 qweight (KB = K / 2) or int8 qweight viewed as uint8 (KB = K)
    scales  (G, N); zeros (G, N) uint8 or None (symmetric: z = 8 for int4; int8 always);
    group_size 0 means one scale per row (then G = 1)."""
    m, k = x.shape
    block_k = min(plan.block_k, group_size) if group_size else plan.block_k
    tiles, split, per_split, ws, locks = split_launch(plan, m, n, cdiv(k, block_k),
                                                      x.device)
    asm = x.dtype in (torch.float16, torch.bfloat16) and not interpreting()
    _tc_matmul_kernel[(tiles, split)](
        x, codes, scales, scales if zeros is None else zeros, out if bias is None else bias,
        out, ws, locks, m, n, k, codes.shape[1], x.stride(0), codes.stride(0), out.stride(0),
        per_split, BITS=bits, GROUP_SIZE=group_size, BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n, BLOCK_K=block_k, SPLIT_K=split, SYMMETRIC=zeros is None,
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BIAS=code_bias(x.dtype),
        ASM=asm, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PREFETCH_GROUPS=spanned_groups(per_split, block_k, group_size) if asm else 0,
        num_warps=plan.num_warps, num_stages=plan.num_stages, **pdl_options(x.device))
    return out
