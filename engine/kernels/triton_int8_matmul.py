"""dequant_matmul for Int8Weight on CUDA through Triton: out = x @ dequant(W).T (+ bias).

Kernel layout (built once per weight and cached in `weight.repacked["triton"]`):
  words   int32 (N, KW), KW = ceil(K / 4): byte i of words[n, j] is q[n, 4j + i] (int8). The
          canonical qweight (N, K) int8 reinterpreted: a view when K % 4 == 0, else a padded copy.
  scales  (G, N) in the stored dtype (G = 1 when per-channel), transposed so one group's N scales
          are contiguous (a view of a CUDA QuantizedLinear's group-major scales: no copy).

Napkin math, Llama-3-8B q_proj (N = K = 4096) at M = 1: 16.8 MB of codes + 8 KB of per-channel
scales, 5.6 us at ~3.0 TB/s, half the bf16 layer's 33.6 MB.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.quant.formats import Int8Weight

from .triton_common import (Plan, as_words, await_inputs, cdiv, dequant_then_matmul,
                            finish_tile, int8_plane, load_words, load_x_tile, log_plan, pdl_options,
                            split_launch, unpack_int8, x_in)
from .triton_gemv_planes import plane_words, planes_matmul, words_per_plane
from .triton_gemv_tc import tc_matmul

REPACK_KEY = "triton"


@triton.jit
def _gemv_chunk(words, x_ptr, stride_xm, m0, M, k0, K, BLOCK_M: tl.constexpr,
                EVEN_K: tl.constexpr):
    """(BLOCK_N, BLOCK_M) fp32 unscaled partial for one K-chunk on CUDA cores, BLOCK_M in {1, 2};
    byte plane i of words (BLOCK_N, W) meets x[k0 + 4j + i] (why planes: see the int4 kernel)."""
    offs_x = k0 + 4 * tl.arange(0, words.shape[1])
    zero = tl.zeros_like(offs_x)  # row bounds as tensors: the interpreter rejects scalar masks
    row0 = x_ptr + m0 * stride_xm + offs_x
    row1 = row0 + stride_xm
    hi = words >> 16
    part0 = tl.zeros(words.shape, dtype=tl.float32)
    part1 = tl.zeros(words.shape, dtype=tl.float32)
    for i in tl.static_range(4):
        w = int8_plane(words, hi, i)
        x0 = tl.load(row0 + i, mask=x_in(offs_x + i, zero + m0, M, K, EVEN_K), other=0.0)
        x0 = x0.to(tl.float32)
        part0 += w * x0[None, :]
        if BLOCK_M == 2:
            x1 = tl.load(row1 + i, mask=x_in(offs_x + i, zero + m0 + 1, M, K, EVEN_K),
                         other=0.0).to(tl.float32)
            part1 += w * x1[None, :]
    cols = tl.arange(0, BLOCK_M)[None, :]
    out = tl.where(cols == 0, tl.sum(part0, axis=1)[:, None], 0.0)
    if BLOCK_M == 2:
        out += tl.where(cols == 1, tl.sum(part1, axis=1)[:, None], 0.0)
    return out


@triton.jit
def _int8_matmul_kernel(
        x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, chunks_per_split,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        USE_DOT: tl.constexpr, SCALE_IN_TILE: tl.constexpr, EVEN_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """Like the int4 kernel. GROUP_SIZE 0 means per-channel: the whole K sum is scaled once at
    the end; otherwise BLOCK_K divides GROUP_SIZE and each chunk's partial is scaled."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    WORDS: tl.constexpr = BLOCK_K // 4
    offs_w = tl.arange(0, WORDS)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :]  # (BLOCK_N, WORDS)
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # (BLOCK_K, BLOCK_M)

    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PREFETCH:  # weights only: may run before the kernel before has finished
        ahead = load_words(w_ptrs, c_start, c_end, n_mask, offs_w, stride_wn, EVEN_K)
    await_inputs(PDL)
    for c in range(c_start, c_end):
        k0 = c * BLOCK_K
        if PREFETCH:
            words = ahead
            ahead = load_words(w_ptrs, c + 1, c_end, n_mask, offs_w, stride_wn, EVEN_K)
        else:
            words = load_words(w_ptrs, c, c_end, n_mask, offs_w, stride_wn, EVEN_K)
        if GROUP_SIZE == 0:
            s = tl.full((BLOCK_N,), 1.0, tl.float32)
        else:
            s = tl.load(s_ptr + (k0 // GROUP_SIZE) * N + offs_n, mask=n_mask,
                        other=0.0).to(tl.float32)
        if USE_DOT:
            x = load_x_tile(x_ptrs, k0, offs_k, m_mask, K, EVEN_K)
            wq = unpack_int8(words)  # (BLOCK_N, BLOCK_K) fp32 q
            if GROUP_SIZE == 0:
                acc = tl.dot(wq.to(x.dtype), x, acc, input_precision=DOT_PRECISION)
            elif SCALE_IN_TILE:
                w = (wq * s[:, None]).to(x.dtype)
                acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
            else:
                part = tl.dot(wq.to(x.dtype), x, input_precision=DOT_PRECISION)
                acc += part * s[:, None]
        else:
            acc += _gemv_chunk(words, x_ptr, stride_xm, pid_m * BLOCK_M, M, k0, K, BLOCK_M,
                               EVEN_K) * s[:, None]
    if GROUP_SIZE == 0:
        acc *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    finish_tile(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr,
                pid, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _int8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sg,
                         GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr):
    """out (N, K) row-major in out's dtype = q * s for a (BLOCK_N, BLOCK_K) tile; scales (G, N)
    with group stride stride_sg (a column block of a wider layer's)."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 4
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = c * WORDS + tl.arange(0, WORDS)
    offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :]
    if EVEN_K:
        words = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        out_mask = n_mask[:, None]
    else:
        words = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_w < stride_wn)[None, :], other=0)
        out_mask = n_mask[:, None] & (offs_k < K)[None, :]
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(s_ptr + ((c * BLOCK_K) // GROUP_SIZE) * stride_sg + offs_n, mask=n_mask,
                    other=0.0).to(tl.float32)
    w = (unpack_int8(words) * s[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=out_mask)


def packed(weight: Int8Weight) -> dict[str, Tensor]:
    """The kernel layout of `weight` (see the module docstring), built on first use."""
    cache = weight.repacked
    if REPACK_KEY not in cache:
        # (N, K) as bytes: copies and pads without sign games
        cache[REPACK_KEY] = {"words": as_words(weight.qweight.view(torch.uint8)),  # (N, KW)
                             "scales": weight.scales.t().contiguous()}  # (G, N)
    return cache[REPACK_KEY]


def plane_packed(weight: Int8Weight, w: int, block_n: int) -> Tensor:
    """The plane layout (triton_gemv_planes.py) of `weight` for W = w, built on first use."""
    key = f"planes-w{w}-n{block_n}"
    if key not in weight.repacked:
        weight.repacked[key] = plane_words(weight.qweight.view(torch.uint8), 8, w, block_n)
    return weight.repacked[key]


def default_plan(m: int, n: int, k: int, group_size: int | None) -> Plan:
    """Picked per shape class from the H100 sweeps of benchmarks/bench_kernels.py --sweep
    (numbers in benchmarks/NOTES-kernels.md and results/nvidia-h100-80gb-hbm3/sweep.json)."""
    block_k = min(group_size or 128, 128)
    # H100, M=1, int8 (us per layer shape, 8 rotating copies): 4096x4096 12.1, 1024x4096 7.5
    # (n64 + prefetch); 14336x4096 27.3 (n64 + prefetch, 8 programs per SM); 4096x14336 27.7.
    if m == 1:
        if n >= 8192:
            return Plan("gemv", block_m=1, block_n=64, block_k=block_k, prefetch=True, waves=8)
        if k >= 8192:  # down_proj 4096x14336: 27.7 us vs 28.7 at n64
            return Plan("gemv", block_m=1, block_n=128, block_k=block_k, prefetch=True)
        return Plan("gemv", block_m=1, block_n=64, block_k=block_k, prefetch=True)
    # M=2..16: the tl.dot path with 16-row tiles beat the 2-row GEMV (22 vs 14 us at 4096x4096,
    # M=4, int4) and 32/128-column tiles; M<=64: 64-row tiles were within 5% of the best everywhere
    # and beat dequant+cuBLAS by 2x on the 14336-wide layers. Above that dequant+cuBLAS wins
    # (4096x4096, M=512: 41.7 us vs 78.9 fused; M=2048: 104.4 us = 658 TFLOP/s vs 193 fused,
    # whose 128x128 tiles stall near 356 TFLOP/s). M=65..511 was not measured.
    if m <= 16:
        return Plan("dot", block_m=16, block_n=64, block_k=block_k, num_stages=3)
    if m <= 64:
        return Plan("dot", block_m=64, block_n=64, block_k=block_k, num_stages=3)
    return Plan("dequant")


def int8_matmul(x: Tensor, weight: Int8Weight, bias: Tensor | None, out: Tensor,
                plan: Plan | None = None) -> Tensor:
    """out (M, N) = x (M, K) @ dequant(weight).T + bias; x has unit stride along K."""
    m, k = x.shape
    n = weight.out_features
    gs = weight.group_size if weight.group_size and weight.group_size < k else 0
    if plan is None:
        plan = default_plan(m, n, k, gs or None)
        log_plan("int8", n, k, plan)
    if plan.path == "gemv" and plan.block_m not in (1, 2):
        raise ValueError(f"the gemv path takes 1 or 2 rows per program, not {plan.block_m}")
    p = packed(weight)
    words, scales = p["words"], p["scales"]
    if plan.path == "planes":
        w = words_per_plane(plan, 8, gs)
        return planes_matmul(x, plane_packed(weight, w, plan.block_n), scales, None, 8, gs, n,
                             w, bias, out, plan)
    if plan.path == "tc":
        return tc_matmul(x, weight.qweight.view(torch.uint8), scales, None, 8, gs, n, bias, out,
                         plan)
    block_k = min(plan.block_k, gs) if gs else plan.block_k
    even_k = k % block_k == 0
    if plan.path == "dequant":
        def dequant_rows(n0: int, n1: int, w16: Tensor) -> None:
            grid = (cdiv(n1 - n0, 64), cdiv(k, block_k))
            _int8_dequant_kernel[grid](words[n0:n1], scales[:, n0:n1], w16, n1 - n0, k,
                                       words.shape[1], scales.shape[1], GROUP_SIZE=gs,
                                       BLOCK_N=64, BLOCK_K=block_k, EVEN_K=even_k, num_warps=4)
        return dequant_then_matmul(x, n, k, bias, out, dequant_rows)

    tiles, split, per_split, ws, locks = split_launch(plan, m, n, cdiv(k, block_k),
                                                      x.device)
    _int8_matmul_kernel[(tiles, split)](
        x, words, scales, out if bias is None else bias, out, ws, locks,
        m, n, k, x.stride(0), words.shape[1], out.stride(0), per_split,
        GROUP_SIZE=gs, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=block_k,
        SPLIT_K=split, HAS_BIAS=bias is not None, USE_DOT=plan.path == "dot",
        SCALE_IN_TILE=plan.scale_in_tile, EVEN_K=even_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PREFETCH=plan.prefetch and plan.path == "gemv", num_warps=plan.num_warps,
        num_stages=plan.num_stages, **pdl_options(x.device))
    return out
