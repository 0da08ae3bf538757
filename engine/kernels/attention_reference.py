"""Reference attention over a KV cache: the specification and the CPU path.

Grouped-query attention without copying K/V per query head: the G = H / Hkv query heads that share
a KV head are folded into the query-row dimension, so each KV head is read once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def visibility_mask(positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """(T, S) bool: query at positions[t] sees key s iff s <= pos (and s > pos - window)."""
    keys = torch.arange(kv_len, device=positions.device)
    mask = keys[None, :] <= positions[:, None]
    if window is not None:
        mask &= keys[None, :] > positions[:, None] - window
    return mask


def grouped_attention(q, k, v, mask):
    """q (B, H, T, D); k, v (B, Hkv, S, D); mask (T, S) bool or None → (B, H, T, D)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qg = q.reshape(b, hkv, g * t, d)  # (B, Hkv, G*T, D): heads of a group are consecutive
    if mask is not None:
        mask = mask.repeat(g, 1)  # (G*T, S)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    return out.reshape(b, h, t, d)


def kv_attention_dense(q, cache, layer, positions, kv_len, k_new, v_new):
    """Attention of q (B, H, T, D) at `positions` over the 16-bit cache."""
    n = cache.max_seq if kv_len is None else kv_len
    k, v = cache.read(layer, n)
    t = q.shape[2]
    if kv_len is not None and t == 1 and cache.sliding_window is None:
        mask = None  # one query at the last position sees every key in [0, kv_len)
    else:
        mask = visibility_mask(positions, n, cache.sliding_window)
    return grouped_attention(q, k, v, mask)


# Reference attention per cache class; quantized caches add theirs beside their own code.
REFERENCE_BY_CACHE = {}


def kv_attention_reference(q, cache, layer, positions, kv_len, k_new, v_new):
    """q (B, H, T, D) at `positions` (T,) attends over the cache's first kv_len positions (None:
    the whole cache, masked); k_new, v_new are the chunk's own 16-bit keys and values."""
    return REFERENCE_BY_CACHE[type(cache)](q, cache, layer, positions, kv_len, k_new, v_new)


def _register():
    from lowbit.engine.kv_cache import DenseKVCache
    from . import registry
    REFERENCE_BY_CACHE[DenseKVCache] = kv_attention_dense
    registry.register("kv_attention", "reference", kv_attention_reference,
                      priority={"cpu": 100, "cuda": 100})


_register()
