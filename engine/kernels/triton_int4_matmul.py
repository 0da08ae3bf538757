"""dequant_matmul for Int4Weight on CUDA through Triton: out = x @ dequant(W).T (+ bias).

Kernel layout (built once per weight and cached in `weight.repacked["triton"]`):
  words   int32 (N, KW), KW = ceil(K / 8): nibble i (bits 4i..4i+3) of words[n, j] is u[n, 8j + i].
          This is the canonical qweight (N, K/2) uint8 reinterpreted, little-endian: a view, no
          copy, when K % 8 == 0 (a zero-padded copy otherwise).
  scales  (G, N) in the stored dtype: transposed so one group's N scales are contiguous (a view,
          no copy, of the group-major scales a CUDA QuantizedLinear holds: engine/linear.py).
  zeros   (G, N) uint8, transposed likewise; None when symmetric (z = 8).

Napkin math, Llama-3-8B q_proj (N = K = 4096, group 128) at M = 1: the kernel must read
4096*2048 B of codes + 4096*32*2 B of scales = 8.65 MB; at the H100's ~3.0 TB/s copy rate that is
2.9 us. The same layer in bf16 reads 33.6 MB (11.2 us). At M = 2048 it is 68.7 GFLOP, ~100 us at
~690 TFLOP/s: there only the matmul units matter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lowbit.quant.formats import Int4Weight

from .triton_common import (Plan, as_words, await_inputs, cdiv, dequant_then_matmul,
                            finish_tile, int4_plane, load_words, load_x_tile, log_plan, pdl_options,
                            split_launch, unpack_int4, x_in)
from .triton_gemv_planes import plane_words, planes_matmul, words_per_plane
from .triton_gemv_tc import tc_matmul

REPACK_KEY = "triton"


@triton.jit
def _gemv_chunk(words, zf, s, x_ptr, stride_xm, m0, M, k0, K, BLOCK_M: tl.constexpr,
                EVEN_K: tl.constexpr):
    """(BLOCK_N, BLOCK_M) fp32 partial out for one K-chunk on CUDA cores, BLOCK_M in {1, 2}.

    Works per nibble plane: plane i of words (BLOCK_N, W) holds k = k0 + 8j + i, so it meets
    x[k0 + 8j + i] (a (W,) strided load from L1) without unpacking into k order. Unpacking first
    (join + reshape) lets Triton pick the activation row's layout for the product and move the
    whole weight tile through shared memory to match it (seen in the TTGIR, Triton 3.9, sm_90).
    Per weight: LOP3, FADD (u - z), one FFMA per activation row."""
    offs_x = k0 + 8 * tl.arange(0, words.shape[1])
    zero = tl.zeros_like(offs_x)  # row bounds as tensors: the interpreter rejects scalar masks
    row0 = x_ptr + m0 * stride_xm + offs_x
    row1 = row0 + stride_xm
    hi = words >> 16
    part0 = tl.zeros(words.shape, dtype=tl.float32)
    part1 = tl.zeros(words.shape, dtype=tl.float32)
    for i in tl.static_range(8):
        w = int4_plane(words, hi, zf, i)
        x0 = tl.load(row0 + i, mask=x_in(offs_x + i, zero + m0, M, K, EVEN_K), other=0.0)
        x0 = x0.to(tl.float32)
        part0 += w * x0[None, :]
        if BLOCK_M == 2:
            x1 = tl.load(row1 + i, mask=x_in(offs_x + i, zero + m0 + 1, M, K, EVEN_K),
                         other=0.0).to(tl.float32)
            part1 += w * x1[None, :]
    cols = tl.arange(0, BLOCK_M)[None, :]
    out = tl.where(cols == 0, (tl.sum(part0, axis=1) * s)[:, None], 0.0)
    if BLOCK_M == 2:
        out += tl.where(cols == 1, (tl.sum(part1, axis=1) * s)[:, None], 0.0)
    return out


@triton.jit
def _int4_matmul_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, chunks_per_split,
        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SYMMETRIC: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, SCALE_IN_TILE: tl.constexpr,
        EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
        PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """Program (tile, pid_k) computes out[m-tile, n-tile] over K-chunks
    [pid_k * chunks_per_split, ...) of BLOCK_K columns; BLOCK_K divides GROUP_SIZE, so a chunk
    has one scale per row. The accumulator is (BLOCK_N, BLOCK_M): weights are the left operand
    of tl.dot, which lets Hopper's wgmma take them straight from registers."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    WORDS: tl.constexpr = BLOCK_K // 8
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
        if USE_DOT:
            x = load_x_tile(x_ptrs, k0, offs_k, m_mask, K, EVEN_K)
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SYMMETRIC:
            zf = tl.full((BLOCK_N,), 8.0, tl.float32)
        else:
            zf = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        if USE_DOT:
            wq = unpack_int4(words, zf)  # (BLOCK_N, BLOCK_K) fp32, u - z exactly
            if SCALE_IN_TILE:
                w = (wq * s[:, None]).to(x.dtype)
                acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
            else:
                part = tl.dot(wq.to(x.dtype), x, input_precision=DOT_PRECISION)
                acc += part * s[:, None]
        else:
            acc += _gemv_chunk(words, zf, s, x_ptr, stride_xm, pid_m * BLOCK_M, M, k0, K,
                               BLOCK_M, EVEN_K)
    finish_tile(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr,
                pid, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sg,
                         GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SYMMETRIC: tl.constexpr, EVEN_K: tl.constexpr):
    """out (N, K) row-major in out's dtype = (u - z) * s for a (BLOCK_N, BLOCK_K) tile; scales
    and zeros (G, N) with group stride stride_sg (a column block of a wider layer's)."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    WORDS: tl.constexpr = BLOCK_K // 8
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
    g = (c * BLOCK_K) // GROUP_SIZE
    s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        zf = tl.full((BLOCK_N,), 8.0, tl.float32)
    else:
        zf = tl.load(z_ptr + g * stride_sg + offs_n, mask=n_mask, other=0).to(tl.float32)
    wq = unpack_int4(words, zf)
    w = (wq * s[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=out_mask)


def packed(weight: Int4Weight) -> dict[str, Tensor | None]:
    """The kernel layout of `weight` (see the module docstring), built on first use."""
    cache = weight.repacked
    if REPACK_KEY not in cache:
        zeros = None if weight.zeros is None else weight.zeros.t().contiguous()  # (G, N)
        cache[REPACK_KEY] = {"words": as_words(weight.qweight),  # (N, KW) from (N, K/2) uint8
                             "scales": weight.scales.t().contiguous(),  # (G, N)
                             "zeros": zeros}
    return cache[REPACK_KEY]


def plane_packed(weight: Int4Weight, w: int, block_n: int) -> Tensor:
    """The plane layout (triton_gemv_planes.py) of `weight` for W = w, built on first use."""
    key = f"planes-w{w}-n{block_n}"
    if key not in weight.repacked:
        weight.repacked[key] = plane_words(weight.unpacked(), 4, w, block_n)
    return weight.repacked[key]


def default_plan(m: int, n: int, k: int, group_size: int) -> Plan:
    """Picked per shape class from the H100 sweeps of benchmarks/bench_kernels.py --sweep
    (numbers in benchmarks/NOTES-kernels.md and results/nvidia-h100-80gb-hbm3/sweep.json)."""
    block_k = min(group_size or 128, 128)
    # M <= 16: the tensor-core path, 2 warps (mma.sync, not wgmma) on 32 weight rows, 3 stages,
    # 8 programs per SM. H100, int4 g128, us per Llama-3-8B layer (q, k, v, o, gate, up, down;
    # 4 rotating copies; probe of 2026-11-27, rerun by bench_kernels --sweep into
    # results/nvidia-h100-80gb-hbm3/sweep.json): M=1 111.1 against 117.9 for the CUDA-core
    # GEMV (down 23.3 vs 28.1, gate 24.8 vs 24.9); M=4 113.2 against 153.5 for the 16-row
    # "dot" path; M=16 (16-row tiles) 133.3 against 155.1. 4-warp wgmma tiles of 64 rows: 117.8
    # at M=1 but the best on the 14336-wide layers (H100 bench_kernels --sweep of the same day,
    # gate 14336x4096: M=1 24.1 vs 24.9, M=16 28.2 vs 30.3); more stages or 16 programs per SM
    # on 16-row tiles: slower.
    if m <= 16:
        if n >= 8192:
            return Plan("tc", block_m=8 if m <= 8 else 16, block_n=64, block_k=block_k,
                        num_warps=4, num_stages=4, waves=8)
        return Plan("tc", block_m=8 if m <= 8 else 16, block_n=32, block_k=block_k, num_warps=2,
                    num_stages=3, waves=8)
    if m <= 64:
        return Plan("dot", block_m=64, block_n=64, block_k=block_k, num_stages=3)
    return Plan("dequant")


def int4_matmul(x: Tensor, weight: Int4Weight, bias: Tensor | None, out: Tensor,
                plan: Plan | None = None) -> Tensor:
    """out (M, N) = x (M, K) @ dequant(weight).T + bias; x has unit stride along K."""
    m, k = x.shape
    n = weight.out_features
    gs = weight.group_size
    if plan is None:
        plan = default_plan(m, n, k, gs)
        log_plan("int4", n, k, plan)
    if plan.path == "gemv" and plan.block_m not in (1, 2):
        raise ValueError(f"the gemv path takes 1 or 2 rows per program, not {plan.block_m}")
    p = packed(weight)
    words, scales, zeros = p["words"], p["scales"], p["zeros"]
    if plan.path == "planes":
        w = words_per_plane(plan, 4, gs)
        return planes_matmul(x, plane_packed(weight, w, plan.block_n), scales, zeros, 4, gs, n,
                             w, bias, out, plan)
    if plan.path == "tc":
        return tc_matmul(x, weight.qweight, scales, zeros, 4, gs, n, bias, out, plan)
    z_arg = scales if zeros is None else zeros  # never read when symmetric
    block_k = min(plan.block_k, gs)
    even_k = k % block_k == 0
    if plan.path == "dequant":
        def dequant_rows(n0: int, n1: int, w16: Tensor) -> None:
            grid = (cdiv(n1 - n0, 64), cdiv(k, block_k))
            _int4_dequant_kernel[grid](words[n0:n1], scales[:, n0:n1], z_arg[:, n0:n1], w16,
                                       n1 - n0, k, words.shape[1], scales.shape[1],
                                       GROUP_SIZE=gs, BLOCK_N=64, BLOCK_K=block_k,
                                       SYMMETRIC=zeros is None, EVEN_K=even_k, num_warps=4)
        return dequant_then_matmul(x, n, k, bias, out, dequant_rows)

    tiles, split, per_split, ws, locks = split_launch(plan, m, n, cdiv(k, block_k),
                                                      x.device)
    _int4_matmul_kernel[(tiles, split)](
        x, words, scales, z_arg, out if bias is None else bias, out, ws, locks,
        m, n, k, x.stride(0), words.shape[1], out.stride(0), per_split,
        GROUP_SIZE=gs, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=block_k,
        SPLIT_K=split, SYMMETRIC=zeros is None, HAS_BIAS=bias is not None,
        USE_DOT=plan.path == "dot", SCALE_IN_TILE=plan.scale_in_tile, EVEN_K=even_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PREFETCH=plan.prefetch and plan.path == "gemv", num_warps=plan.num_warps,
        num_stages=plan.num_stages, **pdl_options(x.device))
    return out
