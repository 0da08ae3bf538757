"""Pieces shared by the Triton dequant-matmul kernels (int4 and int8).

- Unpacking through the float-exponent trick: OR a small unsigned integer u into the mantissa of
  a power of two 2**e (e >= bits of u) and the float is exactly 2**e + u; subtracting 2**e + z
  gives u - z exactly. That is one LOP3 and one FADD per weight instead of a shift, a mask and an
  int->float conversion, which H100 issues at a quarter of the FP32 rate (16 vs 64 per
  SM-clock): at M=1, int4 must turn ~6e12 weights/s into floats to keep up with 3 TB/s.
- The split-K epilogue: programs that share an output tile write fp32 partials to a workspace
  and bump a per-tile counter; the last one to arrive sums the partials in split order (so the
  result is deterministic), adds the bias, stores in the output dtype and resets the counter.
  One launch, no memset: an fp32 atomic-add output would need a zeroed buffer and a cast
  (3 launches, order-dependent rounding); a two-pass reduction, a second launch (~2-4 us of
  launch latency, comparable to a whole k/v projection at M=1).
- Programmatic dependent launch (PDL, sm_90+): a decode step is ~300 short kernels in a row.
  Launched with PDL, a kernel's programs are placed on the SMs while the kernel before still runs
  (once every program of that one has passed its own wait), so its launch and start-up overlap
  the other's tail instead of following it. H100, Llama-3-8B shape, 512-token prompt, decode
  tok/s without / with: int4 295-297 / 313, int8 244-245 / 262, bf16 (its matmuls are cuBLAS's,
  launched plainly) 156-157 / 156-159. Asking L2 for each matmul program's first weight chunks
  before its wait (cp.async.bulk.prefetch) measured no better (int4 307 with 2 chunks, 281 with
  8): not kept.
- Per-device buffers grown on demand and reused across layers: the split-K workspace and
  counters, and the dequantization scratch of the prefill path. Calls on one stream use them in
  order; two streams running dequant_matmul concurrently on one device would race on them.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
_logged_plans: set[tuple] = set()
logger = logging.getLogger("lowbit.kernels")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. triton.cdiv and triton.next_power_of_2 are constexpr functions
    since Triton 3.9: ~1.6 us a call on the host, ~800 calls a prefill forward."""
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pdl_options(device: torch.device) -> dict:
    """Launch options for a kernel that starts with `await_inputs`: PDL on NVIDIA devices of
    compute capability 9 or above unless LOWBIT_PDL=0 (for A/B timings), off elsewhere (ROCm
    reports its GPUs as "cuda" devices with capabilities of 9 too, and has no griddepcontrol)."""
    on = (device.type == "cuda" and not interpreting() and torch.version.hip is None
          and os.environ.get("LOWBIT_PDL", "1") != "0" and _capability(device) >= 9)
    return {"PDL": on, "launch_pdl": on}


def _capability(device: torch.device) -> int:
    """Compute capability major of a CUDA device (asked once a device: this is on every launch)."""
    return _capability_major(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """With PDL, wait until the kernel before has finished and its writes are visible, then let
    the next kernel's programs be placed. Every kernel launched with pdl_options calls this
    before it reads anything the kernel just before it may write and before it writes anything:
    that keeps the order transitive (a kernel that has passed its wait implies all earlier ones
    are done), so what runs before the wait may read anything written two or more kernels back
    (weights; the decode position and the cache's older entries for the decode attention)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def buffer(name: str, device: torch.device, dtype: torch.dtype, numel: int,
           zeroed: bool = False) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, one per (name, device, dtype), grown as needed.
    `zeroed` buffers are zero when (re)allocated; their users must leave them zero."""
    key = (name, torch.device(device), dtype)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        alloc = torch.zeros if zeroed else torch.empty
        buf = alloc(max(numel, 1), device=device, dtype=dtype)
        _buffers[key] = buf
    return buf[:numel]


def split_k_buffers(device: torch.device, split_k: int, m: int, n: int,
                    tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 workspace of split_k * m * n partials, int32 per-tile arrival counters)."""
    if split_k == 1:
        return buffer("splitk_ws", device, torch.float32, 1), buffer(
            "splitk_locks", device, torch.int32, 1, zeroed=True)
    return (buffer("splitk_ws", device, torch.float32, split_k * m * n),
            buffer("splitk_locks", device, torch.int32, tiles, zeroed=True))


def split_launch(plan: "Plan", m: int, n: int, chunks: int, device: torch.device):
    """(tiles, split, chunks per split, workspace, counters) of a split-K launch on a
    (tiles, split) grid: output tiles of plan.block_m x plan.block_n, `chunks` K-chunks dealt
    out so that no split is empty."""
    tiles = cdiv(m, plan.block_m) * cdiv(n, plan.block_n)
    split = plan.split_k or pick_split_k(tiles, chunks, device, plan.waves)
    per_split = cdiv(chunks, split)
    split = cdiv(chunks, per_split)
    ws, locks = split_k_buffers(device, split, m, n, tiles)
    return tiles, split, per_split, ws, locks


def as_words(q: torch.Tensor) -> torch.Tensor:
    """(N, KW) int32 view of (N, B) bytes, B padded with zeros to a multiple of 4 (a copy only
    when padding, misalignment or strides require one)."""
    pad = -q.shape[1] % 4
    if pad or q.storage_offset() % 4 or not q.is_contiguous():
        q = torch.nn.functional.pad(q, (0, pad)).contiguous()  # (N, 4 * KW)
    return q.view(torch.int32)


# The scratch a layer is dequantized into holds at most this many bytes: Llama-3-8B's fused
# gate/up (28672 x 4096, 235 MB in bf16) goes through it in two row pieces (one more dequant
# launch and cuBLAS call a layer at prefill), every other layer in one; the scratch stays
# allocated for the next prefill, so its size is part of every later peak.
SCRATCH_BYTES = 128 << 20


def dequant_then_matmul(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None,
                        out: torch.Tensor, dequant_rows) -> torch.Tensor:
    """out (M, N) = x @ W.T (+ bias) on cuBLAS, W dequantized into the per-device scratch in
    pieces of at most SCRATCH_BYTES (multiples of 64 rows): dequant_rows(n0, n1, w16) writes
    rows [n0, n1) of W into w16 (n1 - n0, k) in x's dtype."""
    rows = min(n, max(64, SCRATCH_BYTES // (k * x.element_size()) // 64 * 64))
    scratch = buffer("dequant", x.device, x.dtype, rows * k)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w16 = scratch[:(n1 - n0) * k].view(n1 - n0, k)
        dequant_rows(n0, n1, w16)
        piece = out[:, n0:n1]  # rows of stride N: cuBLAS writes the column block in place
        if bias is None:
            torch.mm(x, w16.t(), out=piece)
        else:
            torch.addmm(bias[n0:n1].to(x.dtype), x, w16.t(), out=piece)
    return out


def checked_out(out: torch.Tensor | None, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A caller's output buffer after checking it fits (contiguous, shape, dtype), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(shape)} {dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    return out


def num_sms(device: torch.device, interpreted: int = 8) -> int:
    """The device's SM count; `interpreted` stands in under the interpreter (CPU), where a small
    grid is enough to exercise the split paths."""
    if device.type != "cuda":
        return interpreted
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_split_k(tiles: int, chunks: int, device: torch.device, waves: float = 4.0,
                 min_chunks: int = 2) -> int:
    """Split K so that tiles * split fills `waves` programs per SM, each keeping at least
    `min_chunks` K-chunks (fewer makes the partials' traffic and the reduction dominate)."""
    want = max(1, int(waves * num_sms(device)) // max(tiles, 1))
    return max(1, min(want, chunks // min_chunks if chunks >= min_chunks else 1))


@triton.jit
def int4_plane(lo, hi, zf, I: tl.constexpr):
    """(R, W) fp32 u - z of nibble I of every word; lo = words, hi = words >> 16, zf (R,) fp32.
    The nibble sits at bit P = 4 * (I % 4) <= 12 of lo or hi; OR-ed under the exponent of
    2**(23 - P) it is read as 2**(23 - P) + u, so one LOP3 extracts and converts it (a shift and
    mask first cost SHF + SGXT more, seen in the SASS of Triton 3.9 for sm_90)."""
    P: tl.constexpr = 4 * (I % 4)
    MAGIC: tl.constexpr = 0x4B000000 - (P << 23)  # float bits of 2**(23 - P)
    OFFSET: tl.constexpr = 8388608.0 / (1 << P)
    if I < 4:
        f = ((lo & (0xF << P)) | MAGIC).to(tl.float32, bitcast=True)
    else:
        f = ((hi & (0xF << P)) | MAGIC).to(tl.float32, bitcast=True)
    return f - (zf + OFFSET)[:, None]


@triton.jit
def unpack_int4(words, zf):
    """(R, W) int32 words, nibble i of word j = u[8j + i], zf (R,) fp32 zero points ->
    (R, 8W) fp32 u - z in k order. The joins stack the planes in-register on new last axes
    (most significant bit of i first) so the reshape puts u[8j + i] at column 8j + i without
    moving data between threads."""
    hi = words >> 16
    n0 = int4_plane(words, hi, zf, 0)
    n1 = int4_plane(words, hi, zf, 1)
    n2 = int4_plane(words, hi, zf, 2)
    n3 = int4_plane(words, hi, zf, 3)
    n4 = int4_plane(words, hi, zf, 4)
    n5 = int4_plane(words, hi, zf, 5)
    n6 = int4_plane(words, hi, zf, 6)
    n7 = int4_plane(words, hi, zf, 7)
    lo = tl.join(tl.join(n0, n4), tl.join(n2, n6))  # (R, W, 2, 2): bits 2 and 1 of i
    hi = tl.join(tl.join(n1, n5), tl.join(n3, n7))
    both = tl.join(lo, hi)  # (R, W, 2, 2, 2): bits 2, 1, 0 of i
    return tl.reshape(both, (words.shape[0], words.shape[1] * 8))


@triton.jit
def int8_plane(lo, hi, I: tl.constexpr):
    """(R, W) fp32 q of byte I of every word (int8 q): the byte at bit P = 8 * (I % 2) of lo or
    hi, XOR 0x80 (q + 128 in [1, 255]) under the exponent of 2**(23 - P), minus 2**(23 - P) + 128.
    One LOP3 per weight: the mask, the XOR and the exponent bits are disjoint."""
    P: tl.constexpr = 8 * (I % 2)
    BITS: tl.constexpr = (0x4B000000 - (P << 23)) | (0x80 << P)
    OFFSET: tl.constexpr = 8388608.0 / (1 << P) + 128.0
    if I < 2:
        f = ((lo & (0xFF << P)) ^ BITS).to(tl.float32, bitcast=True)
    else:
        f = ((hi & (0xFF << P)) ^ BITS).to(tl.float32, bitcast=True)
    return f - OFFSET


@triton.jit
def unpack_int8(words):
    """(R, W) int32 words, byte i of word j = q[4j + i] (int8) -> (R, 4W) fp32 q in k order."""
    hi = words >> 16
    b0 = int8_plane(words, hi, 0)
    b1 = int8_plane(words, hi, 1)
    b2 = int8_plane(words, hi, 2)
    b3 = int8_plane(words, hi, 3)
    both = tl.join(tl.join(b0, b2), tl.join(b1, b3))  # (R, W, 2, 2): bits 1 and 0 of i
    return tl.reshape(both, (words.shape[0], words.shape[1] * 4))


@triton.jit
def x_in(k, m, M, K, EVEN_K: tl.constexpr):
    """Mask of x[m, k] loads: row in range, and column in range unless K is a chunk multiple
    (a padded word's last columns would read the next row, or past the end of x)."""
    if EVEN_K:
        return m < M
    return (m < M) & (k < K)


@triton.jit
def load_x_tile(x_ptrs, k0, offs_k, m_mask, K, EVEN_K: tl.constexpr):
    """(BLOCK_K, BLOCK_M) activations of the chunk at k0 for tl.dot, zero outside x."""
    if EVEN_K:
        return tl.load(x_ptrs + k0, mask=m_mask[None, :], other=0.0)
    return tl.load(x_ptrs + k0, mask=m_mask[None, :] & ((k0 + offs_k) < K)[:, None], other=0.0)


@triton.jit
def load_words(w_ptrs, c, c_end, n_mask, offs_w, stride_wn, EVEN_K: tl.constexpr):
    """K-chunk c of a (BLOCK_N, WORDS) int32 weight tile; zeros when c >= c_end (a prefetch
    past the last chunk) or past the row's last word. The chunk test is uniform along a row, so
    the loads stay 16 bytes wide."""
    WORDS: tl.constexpr = offs_w.shape[0]
    live = (tl.zeros_like(offs_w) + c) < c_end
    if not EVEN_K:
        live = live & ((c * WORDS + offs_w) < stride_wn)
    return tl.load(w_ptrs + c * WORDS, mask=n_mask[:, None] & live[None, :], other=0)


@triton.jit
def _store_tile(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, HAS_BIAS: tl.constexpr):
    """acc (BLOCK_N, BLOCK_M) fp32 -> out[m, n] in out's dtype, plus bias[n]."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[:, None]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def prefetch_l1(ptrs):
    """Ask L1 for the lines holding ptrs (a hint: nothing waits for it, nothing returns)."""
    tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the lines holding ptrs (a hint, as prefetch_l1). L1 is not filled, so a line
    written later by the kernel before is never read stale from it."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def last_arrival(counter, programs):
    """Count this program in at `counter` after its partial is stored; True for the last of
    `programs` to arrive, which then sees every other program's partial. Each program releases
    and only the last acquires: an acquire (an L1 invalidation, CCTL.IVALL) in every program and
    a fenced counter reset took 9% of a 4096x4096 M=1 matmul's warp-stall samples (ncu, H100)."""
    tl.debug_barrier()  # every thread's partial is stored before the release below
    last = tl.atomic_add(counter, 1, sem="release") == programs - 1
    if last:
        tl.atomic_add(counter, 0, sem="acquire")
    return last


@triton.jit
def reset_counter(counter):
    """The last arrival's reset, relaxed: the next launch that reads it starts after this one
    ends."""
    tl.atomic_xchg(counter, 0, sem="relaxed")


@triton.jit
def finish_tile(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr,
                tile_id, pid_k, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store a program's (BLOCK_N, BLOCK_M) fp32 tile, reducing over split-K programs.
    Workspace layout: ws[s, m, n] fp32, (SPLIT_K, M, N) contiguous."""
    if SPLIT_K == 1:
        _store_tile(acc, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, HAS_BIAS)
    else:
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.store(ws + pid_k * M * N, acc, mask=mask)
        if last_arrival(lock_ptr + tile_id, SPLIT_K):
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                # .cg reads L2, where the other programs' partials landed, never a stale L1 line
                total += tl.load(ws + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            reset_counter(lock_ptr + tile_id)
            _store_tile(total, offs_n, offs_m, N, M, out_ptr, stride_om, bias_ptr, HAS_BIAS)



@dataclass(frozen=True)
class Plan:
    """How one dequant_matmul call runs.

    path           "gemv": fused, CUDA-core FMAs (no tensor cores), for 1-2 activation rows;
                   "planes": the same on a load-time plane layout with contiguous activation
                   runs per code plane (triton_gemv_planes.py), 1-2 rows;
                   "dot": fused, weight tiles dequantized in registers feeding tl.dot;
                   "tc": fused, biased codes from the canonical bytes on the tensor cores with
                   the activations as wgmma's N (triton_gemv_tc.py), block_m 8 or 16;
                   "dequant": dequantize the layer into the per-device scratch, then cuBLAS.
    block_m/n/k    output tile rows (activations), columns (weights), K per loop step ("planes":
                   block_n is also the row tile of the stored layout, block_k the chunk).
    split_k        programs per output tile along K; None picks one that puts `waves` programs
                   on each SM (pick_split_k).
    scale_in_tile  "dot" only: scale the weight tile before the dot (one accumulating dot chain,
                   w rounded to the activation dtype) instead of scaling each K-step's dot result.
    prefetch       "gemv"/"planes" only: load chunk c + 1's words before computing chunk c (the "dot"
                   path gets this from Triton's cp.async pipelining, num_stages).
    """

    path: str
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int | None = None
    waves: float = 4.0
    num_warps: int = 4
    num_stages: int = 2
    scale_in_tile: bool = False
    prefetch: bool = False

    def __post_init__(self):
        if self.path not in ("gemv", "planes", "dot", "tc", "dequant"):
            raise ValueError(f"unknown path {self.path!r}")

    def __str__(self) -> str:
        if self.path == "dequant":
            return "dequant+cublas"
        split = f"auto{self.waves:g}" if self.split_k is None else self.split_k
        extra = (",sit" if self.scale_in_tile else "") + (",pf" if self.prefetch else "")
        return (f"{self.path}(m{self.block_m},n{self.block_n},k{self.block_k},split{split},"
                f"w{self.num_warps},s{self.num_stages}{extra})")


def log_plan(kind: str, n: int, k: int, plan: Plan) -> None:
    """Log (INFO, once per layer shape and plan) the kernel default_plan picked, so `lowbit -v`
    says which path each quantized linear takes."""
    key = (kind, n, k, plan)
    if key not in _logged_plans:
        _logged_plans.add(key)
        logger.info("dequant_matmul %s %dx%d: %s", kind, n, k, plan)
