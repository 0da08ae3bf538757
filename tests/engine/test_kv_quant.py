"""int8/int4 KV caches: one forward equals token-by-token decode, storage is only quantized bytes,
bytes per token meet the targets, and the int4 key scheme earns its place on outlier channels."""
import json

import pytest
import torch
from helpers import one_torch_thread, tiny_config, write_tiny_llama

import lowbit.engine.kernels.attention_quantized_reference  # noqa: F401  (registers int8/int4)
from lowbit.engine.kernels import registry
from lowbit.engine.kv_cache import DenseKVCache, KVCacheError, create_cache
from lowbit.engine.kv_quant import Int4KVCache, Int8KVCache
from lowbit.engine.load import load_model
from lowbit.quant.architecture import ModelConfig
from lowbit.quant.primitives import dequantize_affine, quantize_affine

PROMPT = 70  # crosses the 32-token key groups at 32 and 64
# Decode equivalence runs in fp64: the semantics are exact (1e-15 apart), but in fp32 a projected
# key differs by an ulp between a 70-token and a 1-token matmul, and an ulp that crosses a rounding
# boundary flips an int8 code (58 of 36k code bytes flipped, logits 1.8e-4 apart, on gqa1).
DTYPE = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: with 2 threads, thread wake-ups cost 20x the arithmetic (1.3 s of
    CPU vs 0.06 s for 66 int8 decode steps)."""
    with one_torch_thread():
        yield


def load_fp64(path):
    loaded = load_model(path, device="cpu", dtype="fp32")
    loaded.model.to(DTYPE)
    return loaded


def model_config(head_dim: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2):
    return ModelConfig.from_hf(tiny_config(hidden=heads * head_dim, heads=heads,
                                           kv_heads=kv_heads, layers=layers))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(group) → a model with head_dim 64 (two value groups), 4 query heads over 4 / group
    KV heads; built once per group size."""
    models = {}

    def get(group: int):
        if group not in models:
            path = write_tiny_llama(tmp_path_factory.mktemp(f"gqa{group}"), hidden=256, heads=4,
                                    kv_heads=4 // group, intermediate=128)
            models[group] = load_fp64(path)
        return models[group]
    return get


def logits_in_chunks(loaded, ids, bits, chunks, max_seq=PROMPT, static=False, sink=0):
    """Logits of ids (1, N) fed as consecutive chunks of the given sizes through one cache."""
    if sink:
        cache = Int4KVCache(loaded.config, ids.shape[0], max_seq, DTYPE, "cpu", sink_tokens=sink)
    else:
        cache = create_cache(bits, loaded.config, ids.shape[0], max_seq, DTYPE, "cpu")
    out, p = [], 0
    for n in chunks:
        kv_len = None if static else p + n
        out.append(loaded.model(ids[:, p:p + n], torch.arange(p, p + n), cache, kv_len=kv_len))
        p += n
    return torch.cat(out, dim=1)


def prompt(loaded, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, loaded.config.vocab_size, (1, PROMPT), generator=gen)


@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("bits", [8, 4])
def test_one_forward_equals_decode_steps_and_chunks(tiny, bits, group):
    tiny = tiny(group)
    ids = prompt(tiny)
    with torch.no_grad():
        one = logits_in_chunks(tiny, ids, bits, [PROMPT])
        steps = logits_in_chunks(tiny, ids, bits, [5] + [1] * (PROMPT - 5))
        chunks = logits_in_chunks(tiny, ids, bits, [33, 37])
        dense = logits_in_chunks(tiny, ids, 16, [PROMPT])
    assert (one - steps).abs().max().item() <= 1e-9
    assert (one - chunks).abs().max().item() <= 1e-9
    assert (one - dense).abs().max().item() > 1e-3  # the cache really quantizes


@pytest.mark.parametrize("sink", [4, 40])
def test_int4_with_sink_equals_decode_steps(tiny, sink):
    tiny = tiny(2)
    ids = prompt(tiny, seed=5)
    with torch.no_grad():
        one = logits_in_chunks(tiny, ids, 4, [PROMPT], sink=sink)
        steps = logits_in_chunks(tiny, ids, 4, [3] + [1] * (PROMPT - 3), sink=sink)
        chunks = logits_in_chunks(tiny, ids, 4, [33, 37], max_seq=96, static=True, sink=sink)
        no_sink = logits_in_chunks(tiny, ids, 4, [PROMPT])
    assert (one - steps).abs().max().item() <= 1e-9
    assert (one - chunks).abs().max().item() <= 1e-9
    assert (one - no_sink).abs().max().item() > 1e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_static_masked_cache_equals_sliced(tiny, bits):
    """kv_len=None (whole cache under the mask) in a longer cache gives the same logits."""
    tiny = tiny(2)
    ids = prompt(tiny, seed=4)
    with torch.no_grad():
        sliced = logits_in_chunks(tiny, ids, bits, [PROMPT])
        static_one = logits_in_chunks(tiny, ids, bits, [PROMPT], max_seq=100, static=True)
        static_steps = logits_in_chunks(tiny, ids, bits, [40] + [1] * 30, max_seq=100,
                                        static=True)
    assert (sliced - static_one).abs().max().item() <= 1e-9
    assert (sliced - static_steps).abs().max().item() <= 1e-9


@pytest.mark.parametrize("bits", [8, 4])
def test_sliding_window_decode_equivalence(tmp_path, bits):
    path = write_tiny_llama(tmp_path / "m", model_type="mistral", hidden=128, heads=2, kv_heads=1)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 24}))
    loaded = load_fp64(path)
    assert loaded.config.sliding_window == 24
    ids = prompt(loaded)
    with torch.no_grad():
        one = logits_in_chunks(loaded, ids, bits, [PROMPT])
        steps = logits_in_chunks(loaded, ids, bits, [7] + [1] * (PROMPT - 7))
        no_window = logits_in_chunks(loaded, ids, 16, [PROMPT])
    assert (one - steps).abs().max().item() <= 1e-9
    assert (one[:, 30:] - no_window[:, 30:]).abs().max().item() > 1e-3


def naive_int4_attention(q, k, v, t_query, sink):
    """The definition, one query at a time: q (H, D) at position t sees keys 0..t, key s
    quantized per channel over its 32-token group iff s // 32 < (t + 1) // 32; values per token;
    keys and values of the first `sink` positions unquantized."""
    d = k.shape[2]
    keys = k.clone()
    complete = (t_query + 1) // 32
    for g in range(complete):
        block = k[:, g * 32:(g + 1) * 32].transpose(1, 2).reshape(-1, 32)  # (Hkv*D, 32)
        qq, sc, z = quantize_affine(block, 4, 32, False, torch.float16)
        deq = dequantize_affine(qq, sc, z, 32, torch.float32)
        keys[:, g * 32:(g + 1) * 32] = deq.view(k.shape[0], d, 32).transpose(1, 2)
    vq, vs, vz = quantize_affine(v.reshape(-1, d), 4, 32, False, torch.float16)
    values = dequantize_affine(vq, vs, vz, 32, torch.float32).view(v.shape)
    keys[:, :sink], values[:, :sink] = k[:, :sink], v[:, :sink]
    g = q.shape[0] // k.shape[0]
    keys, values = keys.repeat_interleave(g, 0), values.repeat_interleave(g, 0)  # (H, S, D)
    scores = (q[:, None, :] @ keys[:, :t_query + 1].transpose(1, 2))[:, 0] / d ** 0.5
    return (scores.softmax(-1)[:, None, :] @ values[:, :t_query + 1])[:, 0]  # (H, D)


@pytest.mark.parametrize("group", [1, 2, 4], ids=lambda g: f"gqa{g}")
@pytest.mark.parametrize("sink", [0, 4])
def test_int4_attention_matches_its_definition(group, sink):
    """Direct tensors: a prefill of 45 then a chunk of 30 (positions 45..74, across 64)."""
    hkv = 4 // group
    cfg = model_config(head_dim=64, heads=4, kv_heads=hkv, layers=1)
    gen = torch.Generator().manual_seed(group)
    n = 75
    q = torch.randn(1, 4, n, 64, generator=gen)
    k = torch.randn(1, hkv, n, 64, generator=gen) + 3 * torch.randn(1, hkv, 1, 64, generator=gen)
    v = torch.randn(1, hkv, n, 64, generator=gen)
    cache = Int4KVCache(cfg, 1, 96, torch.float32, "cpu", sink_tokens=sink)
    outs = []
    for lo, hi in ((0, 45), (45, n)):
        pos = torch.arange(lo, hi)
        cache.update(0, pos, k[:, :, lo:hi], v[:, :, lo:hi])
        outs.append(registry.dispatch("kv_attention", q[:, :, lo:hi], cache, 0, pos, hi,
                                      k[:, :, lo:hi], v[:, :, lo:hi]))
    got = torch.cat(outs, dim=2)[0]  # (H, n, D)
    for t in (0, 30, 31, 32, 44, 45, 62, 63, 64, 74):
        want = naive_int4_attention(q[0, :, t], k[0], v[0], t, sink)
        assert (got[:, t] - want).abs().max().item() <= 1e-5, t


def floating_tensors(cache):
    return {name: t for name, t in vars(cache).items()
            if isinstance(t, torch.Tensor) and t.is_floating_point()}


@pytest.mark.parametrize("bits,sink", [(8, 0), (4, 0), (4, 4)])
def test_storage_is_quantized_bytes_only(bits, sink):
    cfg = model_config(head_dim=64, kv_heads=2, layers=3)
    if sink:
        cache = Int4KVCache(cfg, 2, 128, torch.bfloat16, "cpu", sink_tokens=sink)
    else:
        cache = create_cache(bits, cfg, 2, 128, torch.bfloat16, "cpu")
    residual = 0
    for name, t in floating_tensors(cache).items():
        if t.dtype == torch.float16:
            continue  # scales: at most D / 32 per position
        assert t.shape[-2] in (32, sink), f"{name} {tuple(t.shape)}: more than a 16-bit window"
        residual += t.nbytes
    assert residual == (cache.residual_nbytes if bits == 4 else 0)
    assert cache.nbytes == cache.bytes_per_token * cache.max_seq + residual


@pytest.mark.parametrize("head_dim", [64, 128])
def test_bytes_per_token_vs_bf16(head_dim):
    cfg = model_config(head_dim=head_dim, kv_heads=2, layers=4)
    dense = DenseKVCache(cfg, 1, 64, torch.bfloat16, "cpu").bytes_per_token
    int8 = create_cache(8, cfg, 1, 64, torch.bfloat16, "cpu").bytes_per_token
    int4 = create_cache(4, cfg, 1, 64, torch.bfloat16, "cpu").bytes_per_token
    assert int8 / dense <= 0.53
    assert int4 / dense <= 0.30
    assert int4 == 4 * 2 * (head_dim + 2 * 3 * head_dim // 32)  # L*Hkv*(D/2+3D/32+D/2+3D/32)


def outlier_keys(gen, n=128, d=64, h=2):
    """Keys with a few large channels (offset and spread), as RoPE'd keys of real models have."""
    k = torch.randn(1, h, n, d, generator=gen)
    channels = torch.tensor([3, 17, 40])
    k[..., channels] = k[..., channels] * 4 + 12
    return k


def roundtrip(bits, k, v):
    cfg = model_config(head_dim=k.shape[-1], heads=k.shape[1], kv_heads=k.shape[1], layers=1)
    n = k.shape[2]
    cache = create_cache(bits, cfg, 1, n, torch.float32, "cpu")
    cache.update(0, torch.arange(n), k, v)
    if bits == 8:
        return cache.read(0, n)
    return cache.dequantized_keys(0, n), cache.dequantized_values(0, n)


def test_int8_roundtrip_error_is_half_a_step():
    gen = torch.Generator().manual_seed(1)
    k, v = outlier_keys(gen), torch.randn(1, 2, 128, 64, generator=gen)
    kd, vd = roundtrip(8, k, v)
    for x, xd in ((k, kd), (v, vd)):
        step = x.abs().amax(-1, keepdim=True) / 127
        assert ((x - xd).abs() <= 0.5 * step * 1.002 + 1e-7).all()


def test_int4_roundtrip_error_and_per_channel_keys_beat_per_token():
    gen = torch.Generator().manual_seed(2)
    k, v = outlier_keys(gen), torch.randn(1, 2, 128, 64, generator=gen)
    kd, vd = roundtrip(4, k, v)
    # values: asymmetric per token, 32 channels a group, range widened to include 0
    vg = v.view(1, 2, 128, 2, 32)
    step = (vg.amax(-1).clamp(min=0) - vg.amin(-1).clamp(max=0)) / 15
    assert ((vg - vd.view(vg.shape)).abs() <= 0.5 * step[..., None] * 1.002 + 1e-6).all()
    per_channel = (k - kd).pow(2).mean().item()
    q, s, z = quantize_affine(k.reshape(-1, 64), 4, 32, False, torch.float16)
    per_token = (k.reshape(-1, 64) - dequantize_affine(q, s, z, 32, torch.float32)).pow(2).mean()
    assert per_channel < 0.5 * per_token.item()


def test_positions_past_the_end_raise():
    cfg = model_config(layers=1)
    for bits in (8, 4):
        cache = create_cache(bits, cfg, 1, 40, torch.float32, "cpu")
        k = torch.zeros(1, 2, 3, 64)
        with pytest.raises(KVCacheError, match="do not fit"):
            cache.update(0, torch.arange(38, 41), k, k)


def test_int4_needs_even_head_dim():
    with pytest.raises(KVCacheError, match="even head_dim"):
        Int4KVCache(model_config(head_dim=63), 1, 32, torch.float32, "cpu")


def test_create_cache_builds_quantized_classes():
    cfg = model_config()
    assert isinstance(create_cache(8, cfg, 1, 8, torch.float32, "cpu"), Int8KVCache)
    assert isinstance(create_cache(4, cfg, 1, 8, torch.float32, "cpu"), Int4KVCache)


def test_int4_attention_out_of_order_raises():
    cfg = model_config(layers=2)
    cache = create_cache(4, cfg, 1, 64, torch.float32, "cpu")
    x = torch.randn(1, 2, 5, 64)
    cache.update(0, torch.arange(5), x, x)
    with pytest.raises(KVCacheError, match="must directly follow"):
        registry.dispatch("kv_attention", torch.randn(1, 4, 5, 64), cache, 1, torch.arange(5), 5,
                          x, x)
