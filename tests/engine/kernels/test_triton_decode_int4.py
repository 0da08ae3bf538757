"""The int4 decode attention kernel (independent warps, biased fp16 nibble codes, transposed
value tiles, 16-bit residual window and sink tokens) and the one-token int4 write, against the
torch reference and the torch update, under the Triton interpreter (fp16/fp32; its bf16 is
wrong)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels.attention_reference import (grouped_attention,  # noqa: E402
                                                       kv_attention_reference)
from lowbit.engine.kernels.triton_common import buffer  # noqa: E402
from lowbit.engine.kernels.triton_decode_attention import decode_attention  # noqa: E402
from lowbit.engine.kernels.triton_kv_update import decode_write  # noqa: E402
from lowbit.engine.kv_quant import Int4KVCache  # noqa: E402
from attention_cases import config  # noqa: E402
from helpers import rel_err, triton_gpu_only  # noqa: E402

# relative Frobenius error against the reference on the same cache bytes: fp32 runs IEEE dots;
# fp16 rounds q * key scale, the probabilities and the 16-bit keys to 11 bits.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def poison(cache, gen):
    """Garbage everywhere before the writes: codes and zeros random, scales and 16-bit keys and
    values NaN; a stale merge workspace. The writes fill only what positions < n need."""
    for t in (cache.k_packed, cache.v_packed):
        t.random_(0, 256, generator=gen)
    for t in (cache.k_zero, cache.v_zero):
        t.random_(0, 16, generator=gen)
    for t in (cache.k_scale, cache.v_scale, cache.k_residual, cache.k_sink, cache.v_sink):
        t.fill_(float("nan"))
    buffer("attn_decode_ws", torch.device("cpu"), torch.float32, 1 << 16).fill_(float("nan"))
    buffer("attn_decode_ml", torch.device("cpu"), torch.float32, 1 << 12).fill_(float("nan"))


def run(heads, kv_heads, head_dim, n, dtype, max_seq=None, window=None, sink=0, dirty=False,
        seed=0, device="cpu", **launch):
    cfg = config(heads, kv_heads, head_dim, window)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (2, kv_heads, n, head_dim)
    k = (torch.randn(shape, generator=gen, device=device) * 2 + 0.5).to(dtype)
    v = torch.randn(shape, generator=gen, device=device).to(dtype)
    # the reference reads whole key groups (NaN where poisoned): it runs on a clean twin
    caches = [Int4KVCache(cfg, 2, max_seq or n + 70, dtype, device, sink_tokens=sink)
              for _ in range(2 if dirty else 1)]
    if dirty:
        poison(caches[1], gen)
    for cache in caches:
        if n > 1:
            cache.update(1, torch.arange(n - 1, device=device), k[:, :, :n - 1], v[:, :, :n - 1])
        cache.update(1, torch.tensor([n - 1], device=device), k[:, :, n - 1:], v[:, :, n - 1:])
    q = (torch.randn(2, heads, 1, head_dim, generator=gen, device=device) * 3).to(dtype)
    pos = torch.tensor([n - 1], device=device)
    ref = kv_attention_reference(q, caches[0], 1, pos, n, k[:, :, -1:], v[:, :, -1:])
    got = decode_attention(q, caches[-1], 1, pos, **launch)
    assert got.shape == q.shape and got.dtype == dtype
    return rel_err(got, ref)


@pytest.mark.parametrize("heads,kv_heads,head_dim,n", [
    (4, 4, 64, 1),      # GQA 1, a single cached token
    (8, 2, 64, 20),     # GQA 4, only the 16-bit residual window
    (8, 2, 128, 97),    # GQA 4, D 128, three complete groups and one in progress
    (16, 2, 64, 300),   # GQA 8, several blocks per split
    (6, 2, 64, 64),     # GQA 3 (rows padded to 4), the last token completes a group
], ids=["gqa1-n1", "gqa4-n20", "gqa4-d128-n97", "gqa8-n300", "gqa3-n64"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_int4_decode_matches_reference(heads, kv_heads, head_dim, n, dtype):
    assert run(heads, kv_heads, head_dim, n, dtype, num_warps=2, splits=3) < TOL[dtype]


@pytest.mark.parametrize("launch", [dict(num_warps=4, splits=2), dict(num_warps=1, splits=5),
                                    dict(num_warps=8), dict(num_warps=2, splits=1)],
                         ids=["w4-s2", "w1-s5", "w8-default", "w2-s1"])
def test_int4_decode_launch_variants(launch):
    """Blocks of 128 / 32 / 256 / 64 positions: warps whose group lies past n, splits with one
    block, more splits than blocks, one split merged with the group in progress's program (n =
    161: 5 keys in progress)."""
    assert run(8, 2, 64, 161, torch.float16, **launch) < TOL[torch.float16]


def test_int4_decode_ignores_bytes_past_the_position_and_stale_workspace():
    assert run(8, 2, 64, 77, torch.float16, max_seq=256, dirty=True, num_warps=2,
               splits=4) < TOL[torch.float16]


def test_int4_decode_sliding_window():
    assert run(8, 2, 64, 150, torch.float32, window=45, num_warps=2, splits=3) < TOL[torch.float32]


@pytest.mark.parametrize("n,sink,window", [(100, 4, None), (90, 40, None), (5, 8, None),
                                           (120, 4, 50)],
                         ids=["n100-sink4", "n90-sink40", "n5-sink8", "n120-sink4-window50"])
def test_int4_decode_sink_tokens(n, sink, window):
    """Sink positions read as 16-bit keys and values (40: past the first key group; 8 > n:
    unfilled sink slots, NaN, never read; with a window that hides them)."""
    assert run(8, 2, 64, n, torch.float16, sink=sink, window=window, dirty=True, num_warps=2,
               splits=3) < TOL[torch.float16]


@pytest.mark.parametrize("q_size", [1e4, 1e-3])
def test_int4_decode_large_and_tiny_scales(q_size):
    """Queries near fp16's limit (entries up to ~4e4) or tiny, value scales from ~1e-6 to ~0.5, key groups of very
    different ranges: q * key scale and P * value scale are rescaled by powers of two so the
    fp16 operands neither overflow nor flush. Reference: fp32 attention over the cache's
    dequantized keys and values."""
    cfg = config(8, 2, 64)
    gen = torch.Generator().manual_seed(4)
    n = 96  # three complete key groups, none in progress
    k = torch.randn(1, 2, n, 64, generator=gen)
    k[:, :, 32:64] *= 40.0
    k[:, :, 64:] *= 1e-3
    v = torch.randn(1, 2, n, 64, generator=gen) * 1e-4
    v[:, :, 40:60] *= 5e5
    cache = Int4KVCache(cfg, 1, n, torch.float16, "cpu")
    cache.update(1, torch.arange(n), k.half(), v.half())
    q = (torch.randn(1, 8, 1, 64, generator=gen) * q_size).half()
    keys = cache.dequantized_keys(1, n).float()
    values = cache.dequantized_values(1, n).float()
    ref = grouped_attention(q.float(), keys, values, None)
    got = decode_attention(q, cache, 1, torch.tensor([n - 1]), num_warps=2, splits=2)
    assert rel_err(got, ref) < TOL[torch.float16]


@pytest.mark.parametrize("sink", [0, 5])
def test_int4_write_equals_torch_update(sink):
    """The one-token write stores the torch update's exact bytes: value nibbles into their
    transposed tiles (read-modify-write of the shared byte), and the sink positions."""
    cfg = config(4, 2, 64)
    caches = [Int4KVCache(cfg, 2, 72, torch.float16, "cpu", sink_tokens=sink) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for p in range(40):
        k = (torch.randn(2, 2, 1, 64, generator=gen) * 3).half()
        v = (torch.randn(2, 2, 1, 64, generator=gen) * 3).half()
        pos = torch.tensor([p])
        caches[0].update(1, pos, k, v)
        decode_write(caches[1], 1, pos, k, v)
    decode_write(caches[1], 1, torch.tensor([38]), k, v)  # rewrite an earlier even position
    caches[0].update(1, torch.tensor([38]), k, v)
    for name, a in vars(caches[0]).items():
        if isinstance(a, torch.Tensor):
            b = getattr(caches[1], name)
            if name == "k_residual":  # only the group in progress (32..39) is ever read
                a, b = a[:, :, :, :8], b[:, :, :, :8]
            assert torch.equal(a, b), name


# ---- GPU (device run): Llama-3-8B shape, bf16, the benchmark's launch variants ----

on_gpu = triton_gpu_only()


@pytest.mark.gpu
@on_gpu
# 32k and 128k: test_triton_attention.test_gpu_decode_long_context_accuracy (fp64 reference,
# the dense kernel's tolerance)
@pytest.mark.parametrize("n", [1, 63, 4097])
@pytest.mark.parametrize("launch", [dict(), dict(num_warps=2), dict(num_warps=8, splits=100),
                                    dict(num_warps=4, num_stages=3)],
                         ids=["default", "w2", "w8-s100", "w4-st3"])
def test_gpu_int4_decode_llama3_shape(n, launch):
    err = run(32, 8, 128, n, torch.bfloat16, max_seq=n + 100, device="cuda", **launch)
    assert err < 1.5e-2


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("n,sink", [(4097, 4), (20, 32)])
def test_gpu_int4_decode_sink_tokens(n, sink):
    assert run(32, 8, 128, n, torch.bfloat16, sink=sink, device="cuda") < 1.5e-2
