"""Triton rotary (q and k in one launch) against the torch reference (elementwise_reference).

Inputs are column slices of one qkv projection output, as the fused model passes them. On CPU
the kernel runs in the Triton interpreter (fp16/fp32 only: its bf16 arithmetic is wrong); the
gpu-marked test runs Llama-3-8B's heads (32 q, 8 kv, head_dim 128) in bf16 and fp16 on CUDA.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels import elementwise_reference as ref  # noqa: E402
from lowbit.engine.kernels import dispatch, use_backend  # noqa: E402
from lowbit.engine.kernels.triton_rotary import rotary  # noqa: E402
from lowbit.engine.kv_cache import create_cache  # noqa: E402
from lowbit.engine.rope import Rotary  # noqa: E402
from lowbit.quant.architecture import ModelConfig  # noqa: E402
from helpers import rel_err, triton_gpu_only  # noqa: E402

# relative Frobenius error against the reference, which rounds three times in 16-bit where the
# kernel rounds once. Measured worst (interpreter, the shapes below plus 32/8/128): fp32 0,
# fp16 3.9e-4; bf16 has 3 fewer mantissa bits (x8).
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

on_gpu = triton_gpu_only()


def cos_sin(heads, kv_heads, head_dim, positions, dtype):
    cfg = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 64, "hidden_size": heads * head_dim,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    return Rotary(cfg).to(positions.device)(positions, dtype)  # (T, D) each


def projected(batch, t, heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    """q (B, T, H*D), k, v (B, T, Hkv*D): column slices of one (B, T, (H+2Hkv)*D) output."""
    gen = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(batch, t, (heads + 2 * kv_heads) * head_dim, generator=gen, device=device)
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    return qkv.to(dtype).split(sizes, dim=-1)


HEADS = [(4, 2, 32), (6, 2, 16), (5, 1, 64), (3, 3, 24)]  # GQA 2, 3, 5, MHA; half 12 not 2^k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t", [1, 7])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEADS)
def test_rotary_matches_reference(heads, kv_heads, head_dim, t, dtype):
    q, k, _ = projected(2, t, heads, kv_heads, head_dim, dtype)
    cos, sin = cos_sin(heads, kv_heads, head_dim, torch.arange(90, 90 + t), dtype)
    q_want, k_want = ref.rotary(q, k, cos, sin)
    out = (torch.full((2, t, heads, head_dim), float("nan"), dtype=dtype),
           torch.full((2, t, kv_heads, head_dim), float("nan"), dtype=dtype))
    q_got, k_got = rotary(q, k, cos, sin, out=out)
    assert q_got.shape == (2, heads, t, head_dim) and k_got.shape == (2, kv_heads, t, head_dim)
    assert q_got.data_ptr() == out[0].data_ptr() and k_got.data_ptr() == out[1].data_ptr()
    assert rel_err(q_got, q_want) < TOL[dtype] and rel_err(k_got, k_want) < TOL[dtype]


def test_one_rounding_is_closer_to_exact_than_the_reference():
    """fp16: one rounding lands no further from fp64 math than the reference's three."""
    q, k, _ = projected(2, 7, 4, 2, 64, torch.float16, seed=1)
    cos, sin = cos_sin(4, 2, 64, torch.arange(7), torch.float16)
    exact = ref.rotary(q.double(), k.double(), cos.double(), sin.double())
    got, want = rotary(q, k, cos, sin), ref.rotary(q, k, cos, sin)
    for g, w, e in zip(got, want, exact):
        assert rel_err(g, e) <= rel_err(w, e)


def test_contiguous_separate_projections_and_dispatch():
    """Unfused q_proj/k_proj outputs (contiguous), through the registry with each backend forced."""
    q, k, v = (x.contiguous() for x in projected(1, 5, 4, 2, 32, torch.float32, seed=2))
    positions = torch.arange(5)
    cos, sin = cos_sin(4, 2, 32, positions, torch.float32)
    outs = {}
    for backend in ("triton", "reference"):
        cache = _cache(16, 4, 2, 32, torch.float32, batch=1)
        with use_backend(backend):
            outs[backend] = dispatch("rotary_update", q, k, v, cos, sin, cache, 0, positions)
    got, want = outs["triton"], outs["reference"]
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[torch.float32]


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,t", [(1, 1), (2, 7), (1, 512)])
def test_gpu_llama3_heads(batch, t, dtype):
    q, k, _ = projected(batch, t, 32, 8, 128, dtype, device="cuda", seed=3)
    cos, sin = cos_sin(32, 8, 128, torch.arange(4000, 4000 + t, device="cuda"), dtype)
    for g, w in zip(rotary(q, k, cos, sin), ref.rotary(q, k, cos, sin)):
        assert rel_err(g, w) < TOL[dtype]


def _cache(kind, heads, kv_heads, head_dim, dtype, device="cpu", batch=2, max_seq=40):
    cfg = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 64, "hidden_size": heads * head_dim,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5,
        "max_position_embeddings": max_seq})
    cache = create_cache(kind, cfg, batch, max_seq, dtype, device)
    for t in vars(cache).values():  # stale slots must stay untouched, whatever they hold
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.fill_(float("nan"))
    return cache


@pytest.mark.parametrize("kind", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,start", [(1, 0), (1, 17), (7, 30)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (6, 2, 16)])
def test_rotary_update_writes_the_cache_like_the_reference(kind, dtype, t, start, heads,
                                                           kv_heads, head_dim):
    """Dense caches are written by the rotary launch itself, quantized ones by their own update:
    either way the cache ends byte-equal to the reference's, NaN slots elsewhere untouched."""
    q, k, v = projected(2, t, heads, kv_heads, head_dim, dtype, seed=4)
    positions = torch.arange(start, start + t)
    cos, sin = cos_sin(heads, kv_heads, head_dim, positions, dtype)
    caches = {}
    for backend in ("reference", "triton"):
        caches[backend] = _cache(kind, heads, kv_heads, head_dim, dtype)
        with use_backend(backend):
            got = dispatch("rotary_update", q, k, v, cos, sin, caches[backend], 1, positions)
        assert [tuple(x.shape) for x in got] == [(2, heads, t, head_dim),
                                                 (2, kv_heads, t, head_dim),
                                                 (2, kv_heads, t, head_dim)]
        caches[backend + "_out"] = got
    for g, w in zip(caches["triton_out"], caches["reference_out"]):
        assert rel_err(g, w) < TOL[dtype]
    want, got = caches["reference"], caches["triton"]
    for name, w in vars(want).items():
        if isinstance(w, torch.Tensor):
            g = getattr(got, name)
            if dtype == torch.float32:  # one rounding and three agree exactly in fp32
                assert ((g == w) | (g.isnan() & w.isnan())).all(), name
            elif w.is_floating_point():  # the same slots written, the NaN ones left alone
                assert torch.equal(g.isnan(), w.isnan()), name
    # fp16: rotated k rounds once in the kernel, three times in the reference (an int8 code
    # may then land one step over); the written positions read back alike
    for g, w in zip(got.read(1, start + t), want.read(1, start + t)):
        assert rel_err(g[:, :, start:], w[:, :, start:]) < 10 * TOL[dtype]


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rotary_update_dense_cache(dtype):
    q, k, v = projected(1, 1, 32, 8, 128, dtype, device="cuda", seed=5)
    positions = torch.tensor([1234], device="cuda")
    cos, sin = cos_sin(32, 8, 128, positions, dtype)
    want_cache, got_cache = (_cache(16, 32, 8, 128, dtype, "cuda", 1, 2048) for _ in range(2))
    want = ref.rotary_update(q, k, v, cos, sin, want_cache, 1, positions)
    with use_backend("triton"):
        got = dispatch("rotary_update", q, k, v, cos, sin, got_cache, 1, positions)
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[dtype]
    assert rel_err(got_cache.k[1, :, :, 1234], want_cache.k[1, :, :, 1234]) < TOL[dtype]
    assert torch.equal(got_cache.v[1, :, :, 1234], want_cache.v[1, :, :, 1234])
    assert got_cache.k[:, :, :, :1234].isnan().all() and got_cache.v[0].isnan().all()


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", [8, 4])
@pytest.mark.parametrize("position", [1234, 1247])  # 1247: the int4 key group completes
def test_gpu_rotary_update_quantized_cache(kind, position):
    """int8 / int4 caches at one decode token: the write kernel does the rotary too (one launch);
    q, k and the written position read back as the reference's (bf16, Llama-3-8B heads)."""
    dtype = torch.bfloat16
    q, k, v = projected(1, 1, 32, 8, 128, dtype, device="cuda", seed=6)
    positions = torch.tensor([position], device="cuda")
    cos, sin = cos_sin(32, 8, 128, positions, dtype)
    want_cache, got_cache = (_cache(kind, 32, 8, 128, dtype, "cuda", 1, 2048) for _ in range(2))
    for c in (want_cache, got_cache):  # the group's earlier keys, for the int4 completion
        for p in range(position - position % 32, position):
            c.update(1, torch.tensor([p], device="cuda"), k.view(1, 1, 8, 128).transpose(1, 2),
                     v.view(1, 1, 8, 128).transpose(1, 2))
    want = ref.rotary_update(q, k, v, cos, sin, want_cache, 1, positions)
    with use_backend("triton"):
        got = dispatch("rotary_update", q, k, v, cos, sin, got_cache, 1, positions)
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[dtype]
    n = position + 1
    if kind == 8:
        pairs = [(g[:, :, position], w[:, :, position])
                 for g, w in zip(got_cache.read(1, n), want_cache.read(1, n))]
    else:
        start = position - position % 32
        pairs = [(got_cache.dequantized_values(1, n)[:, :, position],
                  want_cache.dequantized_values(1, n)[:, :, position]),
                 (got_cache.k_residual[1, :, :, position % 32],
                  want_cache.k_residual[1, :, :, position % 32])]
        if position % 32 == 31:  # the completed group's quantized keys
            pairs.append((got_cache.dequantized_keys(1, n)[:, :, start:],
                          want_cache.dequantized_keys(1, n)[:, :, start:]))
    for g, w in pairs:
        assert rel_err(g, w) < 10 * TOL[dtype]
