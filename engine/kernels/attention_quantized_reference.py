"""Reference attention over the int8 and int4 KV caches: the specification a fused kernel matches.

Semantics: one forward of T tokens equals T single-token decode steps. A query at position t
sees every key s <= t as the cache held it right after token t was appended:
- int8 (keys and values) and int4 values are quantized when written, so every query sees the
  quantized form of every key and value, its own included;
- int4 keys are quantized per channel once their 32-token group is complete: at time t key s is
  quantized iff s // 32 < (t + 1) // 32, else it is the 16-bit key (from the residual window for
  positions written before this call, from the chunk's own k_new otherwise);
- the int4 cache's sink positions s < sink_tokens are seen as their stored 16-bit keys and values.

Only the first kv_len positions of one layer are dequantized, into temporaries.
"""
from __future__ import annotations

import copy

import torch

from lowbit.engine.kv_cache import KVCacheError
from lowbit.engine.kv_quant import KEY_GROUP, Int4KVCache, Int8KVCache

from .attention_reference import (REFERENCE_BY_CACHE, grouped_attention, kv_attention_dense,
                                  visibility_mask)


def _prior_keys(cache: Int4KVCache, layer: int, p0: int) -> torch.Tensor:
    """16-bit keys of positions [32 * (p0 // 32), p0), saved by the update of this chunk."""
    saved = cache.chunk_prior
    if saved is None or saved[0] != layer or saved[1] != p0:
        raise KVCacheError(f"int4 KV attention at layer {layer}, position {p0} must directly "
                           f"follow the cache update of the same layer and positions")
    return saved[2]


def kv_attention_int4(q, cache: Int4KVCache, layer, positions, kv_len, k_new, v_new):
    """q (B, H, T, D) at contiguous `positions` over the int4 cache; k_new (B, Hkv, T, D).

    One attention over n + w keys: the n quantized keys of [0, n), then the w 16-bit keys of
    positions start .. p1 (start = 32 * (p0 // 32): the group in progress before this chunk, then
    the chunk), each paired with its (quantized) value. With c = (t + 1) // 32 complete groups at
    query t, the mask lets t see quantized key s iff s < 32c and 16-bit key s iff 32c <= s, both
    only for s <= t (and inside the sliding window): every key is seen in exactly one form.
    Sink positions are read from the 16-bit sink in the first part and masked in the second.
    """
    n = cache.max_seq if kv_len is None else kv_len
    p0 = int(positions[0])
    start = p0 - p0 % KEY_GROUP
    values = cache.dequantized_values(layer, n)  # (B, Hkv, n, D)
    fresh = torch.cat((_prior_keys(cache, layer, p0), k_new.to(values.dtype)), dim=2)
    # fresh: (B, Hkv, w, D), the 16-bit keys of positions start .. p1
    w = fresh.shape[2]
    keys = torch.cat((cache.dequantized_keys(layer, n), fresh), dim=2)  # (B, Hkv, n + w, D)
    values = torch.cat((values, values[:, :, start:start + w]), dim=2)  # (B, Hkv, n + w, D)
    sink = min(cache.sink_tokens, n)
    keys[:, :, :sink] = cache.k_sink[layer, :, :, :sink]
    values[:, :, :sink] = cache.v_sink[layer, :, :, :sink]
    complete = (positions[:, None] + 1) // KEY_GROUP * KEY_GROUP  # (T, 1) first 16-bit position
    complete = complete.clamp(min=sink)  # sink keys count as stored, like quantized ones
    quantized_part = visibility_mask(positions, n, cache.sliding_window)  # (T, n)
    quantized_part &= torch.arange(n, device=q.device)[None, :] < complete
    fresh_pos = torch.arange(start, start + w, device=q.device)[None, :]  # (1, w)
    fresh_part = (fresh_pos >= complete) & (fresh_pos <= positions[:, None])  # (T, w)
    if cache.sliding_window is not None:
        fresh_part &= fresh_pos > positions[:, None] - cache.sliding_window
    mask = torch.cat((quantized_part, fresh_part), dim=1)  # (T, n + w)
    return grouped_attention(q, keys, values, mask)


def exact_decode_attention(cache, layer: int, q: torch.Tensor, n: int) -> torch.Tensor:
    """Attention of q (B, H, 1, D) at position n - 1 over positions [0, n) of any cache, in fp64:
    the yardstick for the decode kernels at long contexts. n is a multiple of 32 (no int4 key
    group in progress) and the cache has no sink tokens; the dequantization, exact in fp32
    ((code - zero) * fp16 scale), is taken in fp64, not rounded to the model dtype."""
    if n % KEY_GROUP or getattr(cache, "sink_tokens", 0):
        raise ValueError(f"n = {n} must be a multiple of {KEY_GROUP}, with no sink tokens")
    if isinstance(cache, (Int8KVCache, Int4KVCache)):
        exact = copy.copy(cache)
        exact.dtype = torch.float64
        if isinstance(cache, Int8KVCache):
            k, v = exact.read(layer, n)
        else:
            k, v = exact.dequantized_keys(layer, n), exact.dequantized_values(layer, n)
    else:
        k, v = cache.k[layer, :, :, :n], cache.v[layer, :, :, :n]
    return grouped_attention(q.double(), k.double(), v.double(), None)


def _register():
    # int8 reads back as dequantized K/V of every position; the dense reference is then exact.
    REFERENCE_BY_CACHE[Int8KVCache] = kv_attention_dense
    REFERENCE_BY_CACHE[Int4KVCache] = kv_attention_int4


_register()
