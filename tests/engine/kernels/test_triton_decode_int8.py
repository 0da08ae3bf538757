"""The int8 decode attention kernel (independent warps, biased fp16 codes, transposed value tiles)
against the torch reference, under the Triton interpreter (fp16/fp32; its bf16 is wrong)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels.attention_reference import (grouped_attention,  # noqa: E402
                                                       kv_attention_reference)
from lowbit.engine.kernels.triton_common import buffer  # noqa: E402
from lowbit.engine.kernels.triton_decode_attention import decode_attention  # noqa: E402
from lowbit.engine.kv_quant import Int8KVCache  # noqa: E402
from attention_cases import config  # noqa: E402
from helpers import rel_err, triton_gpu_only  # noqa: E402

# relative Frobenius error against the reference on the same cache bytes: fp32 runs IEEE dots;
# fp16 rounds the reference's dequantized K/V and probabilities to 11 bits.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def run(heads, kv_heads, head_dim, n, dtype, max_seq=None, window=None, poison=False, seed=0,
        **launch):
    cfg = config(heads, kv_heads, head_dim, window)
    gen = torch.Generator().manual_seed(seed)
    shape = (2, kv_heads, n, head_dim)
    k = (torch.randn(shape, generator=gen) * 2 + 0.5).to(dtype)  # offsets: codes of one sign
    v = torch.randn(shape, generator=gen).to(dtype)
    cache = Int8KVCache(cfg, 2, max_seq or n + 70, dtype, "cpu")
    if poison:  # bytes past n: garbage codes, NaN scales; a stale merge workspace
        cache.k.random_(-128, 128, generator=gen)
        cache.v.random_(-128, 128, generator=gen)
        cache.k_scale.fill_(float("nan"))
        cache.v_scale.fill_(float("nan"))
        buffer("attn_decode_ws", torch.device("cpu"), torch.float32, 1 << 16).fill_(float("nan"))
        buffer("attn_decode_ml", torch.device("cpu"), torch.float32, 1 << 12).fill_(float("nan"))
    if n > 1:
        cache.update(1, torch.arange(n - 1), k[:, :, :n - 1], v[:, :, :n - 1])
    cache.update(1, torch.tensor([n - 1]), k[:, :, n - 1:], v[:, :, n - 1:])
    q = (torch.randn(2, heads, 1, head_dim, generator=gen) * 3).to(dtype)
    pos = torch.tensor([n - 1])
    ref = kv_attention_reference(q, cache, 1, pos, n, k[:, :, -1:], v[:, :, -1:])
    got = decode_attention(q, cache, 1, pos, **launch)
    assert got.shape == q.shape and got.dtype == dtype
    return rel_err(got, ref)


@pytest.mark.parametrize("heads,kv_heads,head_dim,n", [
    (4, 4, 64, 1),      # GQA 1, a single cached token
    (8, 2, 128, 97),    # GQA 4, not a multiple of any block
    (16, 2, 64, 300),   # GQA 8, several blocks per split
    (6, 2, 64, 129),    # GQA 3 (rows padded to 4), one past a 64-position value tile
], ids=["gqa1-n1", "gqa4-n97", "gqa8-n300", "gqa3-n129"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_int8_decode_matches_reference(heads, kv_heads, head_dim, n, dtype):
    assert run(heads, kv_heads, head_dim, n, dtype, num_warps=2, warp_tokens=32,
               splits=3) < TOL[dtype]


@pytest.mark.parametrize("launch", [dict(num_warps=4, warp_tokens=64, splits=2),
                                    dict(num_warps=1, warp_tokens=32, splits=5),
                                    dict(num_warps=2, warp_tokens=64),
                                    dict(num_warps=1, warp_tokens=64, splits=4, min_blocks=2)],
                         ids=["w4-t64", "w1-t32-s5", "w2-t64-default-splits", "w1-t64-min2"])
def test_int8_decode_launch_variants(launch):
    """Blocks of 256 / 32 / 128 / 64 positions: warps whose positions all lie past n, splits
    with one block, more splits than blocks, 3 blocks over 2 splits of at least 2."""
    assert run(8, 2, 64, 161, torch.float16, **launch) < TOL[torch.float16]


@pytest.mark.parametrize("min_blocks", [1, 2], ids=["merge", "single-split"])
def test_int8_decode_ignores_bytes_past_the_position_and_stale_workspace(min_blocks):
    assert run(8, 2, 64, 77, torch.float16, max_seq=256, poison=True, num_warps=2,
               warp_tokens=32, splits=4, min_blocks=min_blocks) < TOL[torch.float16]


def test_int8_decode_sliding_window():
    assert run(8, 2, 64, 150, torch.float32, window=45, num_warps=2, warp_tokens=32,
               splits=3) < TOL[torch.float32]


@pytest.mark.parametrize("q_size", [2e4, 1e-3])
def test_int8_decode_large_and_tiny_scales(q_size):
    """Queries near fp16's limit or tiny, value scales from ~1e-6 to ~0.5: the kernel rescales q
    and the probabilities by powers of two so its fp16 operands neither overflow nor flush.
    Reference: fp32 attention over the cache's dequantized keys and values."""
    cfg = config(8, 2, 64)
    gen = torch.Generator().manual_seed(4)
    n = 90
    k = torch.randn(1, 2, n, 64, generator=gen)
    v = torch.randn(1, 2, n, 64, generator=gen) * 1e-4
    v[:, :, 40:60] *= 5e5
    cache = Int8KVCache(cfg, 1, n, torch.float16, "cpu")
    cache.update(1, torch.arange(n), k.half(), v.half())
    q = (torch.randn(1, 8, 1, 64, generator=gen) * q_size).half()
    keys, values = (x.float() for x in cache.read(1, n))
    ref = grouped_attention(q.float(), keys, values, None)
    got = decode_attention(q, cache, 1, torch.tensor([n - 1]), num_warps=2, warp_tokens=32,
                           splits=2)
    assert rel_err(got, ref) < TOL[torch.float16]


# ---- GPU (device run): Llama-3-8B shape, bf16, the benchmark's launch variants ----

@pytest.mark.gpu
@triton_gpu_only()
# 32k and 128k: test_triton_attention.test_gpu_decode_long_context_accuracy (fp64 reference,
# the dense kernel's tolerance)
@pytest.mark.parametrize("n", [1, 63, 4097])
@pytest.mark.parametrize("launch", [dict(), dict(num_warps=2, warp_tokens=64),
                                    dict(num_warps=8, warp_tokens=32, splits=100),
                                    dict(num_warps=2, warp_tokens=64, num_stages=3)],
                         ids=["default", "w2-t64", "w8-t32-s100", "w2-t64-st3"])
def test_gpu_int8_decode_llama3_shape(n, launch):
    cfg = config(32, 8, 128)
    gen = torch.Generator(device="cuda").manual_seed(n)
    k = torch.randn(1, 8, n, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, 8, n, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    cache = Int8KVCache(cfg, 1, n + 100, torch.bfloat16, "cuda")
    cache.update(1, torch.arange(n, device="cuda"), k, v)
    q = torch.randn(1, 32, 1, 128, device="cuda", generator=gen, dtype=torch.bfloat16) * 4
    pos = torch.tensor([n - 1], device="cuda")
    ref = kv_attention_reference(q, cache, 1, pos, n, k[:, :, -1:], v[:, :, -1:])
    assert rel_err(decode_attention(q, cache, 1, pos, **launch), ref) < 1.5e-2
