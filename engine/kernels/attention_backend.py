"""The "triton" backend of kv_attention: Triton split-K decode, SDPA/flash prefill chunks.

Registered with cuda priority 10 (the torch reference is 100). On CPU it runs only under the
Triton interpreter (TRITON_INTERPRET=1, tests) and only when forced.

- Decode (one new token, T = 1): triton_decode_attention.decode_attention reads the dense, int8
  or int4 cache's own bytes, the valid length from positions on the device (CUDA-graph safe,
  kv_len=None reads only the filled part), and matches the reference token for token.
- Prefill chunk (T > 1, kv_len given): the visible keys and values [0, kv_len) in the model
  dtype (views of a dense cache; dequantized temporaries of one layer for int8/int4), then one
  SDPA call with a lower-right causal mask, which dispatches to flash attention on CUDA: no
  (T, kv_len) score or mask tensor is built. GQA is served by repeating the KV heads (a
  temporary of H/Hkv x the layer's visible K/V: 0.5 GB at 32k for Llama-3-8B, per layer, freed
  before the next). With a sliding window the mask is materialised (T x kv_len bools).
  Keep chunks bounded (engine.generate.PREFILL_CHUNK) so long prompts never build T^2 anything.

Semantics of a prefill chunk against the reference (attention_quantized_reference: one forward
equals T single-token decode steps):
- dense and int8: identical (int8 queries see every key and value, their chunk's included, in
  the quantized form the cache holds, as the reference does);
- int4 values: identical (quantized per token when written);
- int4 keys: keys of key groups that were complete before the chunk's first group are read
  quantized, as in the reference; the chunk's own keys and the 16-bit keys of the group it
  starts in are read in 16-bit by all its queries, whereas the reference switches a key group
  to its quantized form for the queries after the group completes. Measured on random data the
  outputs differ by ~1e-2 relative (int4 key rounding), never more than the int4 error itself.
  This keeps the chunk on one flash call; `--backend reference` runs the exact semantics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import registry
from .attention_reference import visibility_mask

BACKEND = "triton"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    from .triton_common import interpreting
    from .triton_decode_attention import decode_attention
    _missing = None
except ImportError as e:  # triton is an optional dependency (the "gpu" extra)
    _missing = f"triton is not importable ({e})"


def _cache_classes():
    from lowbit.engine.kv_cache import DenseKVCache
    from lowbit.engine.kv_quant import Int4KVCache, Int8KVCache
    return DenseKVCache, Int8KVCache, Int4KVCache


def supports(q: Tensor, cache, layer: int, positions: Tensor, kv_len: int | None,
             k_new: Tensor, v_new: Tensor) -> str | None:
    if _missing is not None:
        return _missing
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        return f"runs on cuda (or cpu under TRITON_INTERPRET=1), query is on {q.device}"
    if not isinstance(cache, _cache_classes()):
        return f"no kernel for a {type(cache).__name__}"
    d = q.shape[-1]
    if d < 32 or d > 256 or d & (d - 1):
        return f"head_dim {d} is not a power of two in [32, 256]"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"query dtype {q.dtype} is not fp16, bf16 or fp32"
    if q.shape[2] > 1 and kv_len is None:
        return "a prefill chunk (T > 1) needs kv_len"
    return None


def _int4_visible_keys(cache, layer: int, p0: int, n: int, k_new: Tensor) -> Tensor:
    """Quantized keys of groups complete before the chunk's first group, 16-bit from there on."""
    from lowbit.engine.kv_cache import KVCacheError
    from lowbit.engine.kv_quant import KEY_GROUP
    saved = cache.chunk_prior
    if saved is None or saved[0] != layer or saved[1] != p0:
        raise KVCacheError(f"int4 KV attention at layer {layer}, position {p0} must directly "
                           f"follow the cache update of the same layer and positions")
    keys = cache.dequantized_keys(layer, n)  # (B, Hkv, n, D)
    start = p0 - p0 % KEY_GROUP
    keys[:, :, start:n] = torch.cat((saved[2], k_new.to(keys.dtype)), dim=2)
    return keys


def visible_kv(q: Tensor, cache, layer: int, p0: int, n: int, k_new: Tensor):
    """Keys and values of positions [0, n) as the prefill chunk at p0 reads them, (B, Hkv, n, D)
    in q's dtype: views of a dense cache, temporaries of one layer for a quantized one."""
    dense, int8, int4 = _cache_classes()
    if isinstance(cache, int4):
        return (_int4_visible_keys(cache, layer, p0, n, k_new),
                cache.dequantized_values(layer, n))
    return cache.read(layer, n)


def causal_chunk_attention(q: Tensor, keys: Tensor, values: Tensor, positions: Tensor,
                           window: int | None) -> Tensor:
    """q (B, H, T, D) at positions p0 .. p0+T-1 over keys/values (B, Hkv, n, D), n = p0 + T:
    query t sees keys s <= p0 + t (and s > p0 + t - window)."""
    t, h = q.shape[2], q.shape[1]
    hkv, n = keys.shape[1], keys.shape[2]
    g = h // hkv
    if window is not None:
        from .attention_reference import grouped_attention
        return grouped_attention(q, keys, values, visibility_mask(positions, n, window))
    from torch.nn.attention.bias import causal_lower_right
    # head j reads KV head j // g inside SDPA: repeating K and V to H heads first would put
    # 2 * H/Hkv * n * D values on the device (Llama-3-8B at 32k: 0.5 GB a layer) for nothing
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(t, n),
                                          enable_gqa=g > 1)


def kv_attention_triton(q: Tensor, cache, layer: int, positions: Tensor, kv_len: int | None,
                        k_new: Tensor, v_new: Tensor) -> Tensor:
    """q (B, H, T, D) at `positions` over the cache (already updated with the chunk)."""
    t = q.shape[2]
    if t == 1:
        if q.stride(-1) != 1:
            q = q.contiguous()
        return decode_attention(q, cache, layer, positions)
    p0 = kv_len - t  # positions are contiguous and end at kv_len - 1: no host read of them
    keys, values = visible_kv(q, cache, layer, p0, kv_len, k_new)
    return causal_chunk_attention(q, keys, values, positions, cache.sliding_window)


def _register():
    # int8/int4 reference attention registers itself on import; the fallback needs it.
    from . import attention_quantized_reference  # noqa: F401
    registry.register("kv_attention", BACKEND, kv_attention_triton, supports=supports,
                      priority={"cuda": 10})


_register()
