"""Preallocated, static-shape KV caches.

Every cache has the same interface, so the model and the decode loop do not care which one they
hold:
- update(layer, positions, k, v): write the new tokens' keys and values (B, Hkv, T, D) at the
  absolute positions (T,) (contiguous); a decode step appends one token without touching the rest.
- bytes_per_token: the real bytes one token occupies over all layers, scales included.
Attention over a cache is the registry op "kv_attention" (engine/kernels/), which reads the cache's
own storage.
"""
from __future__ import annotations

import torch

from lowbit.quant.architecture import ModelConfig


class KVCacheError(ValueError):
    """A request the cache cannot hold (e.g. positions beyond its length)."""


class DenseKVCache:
    """16-bit (or fp32) cache: k, v of shape (L, B, Hkv, S, D) in the model's dtype."""

    bits = 16

    def __init__(self, cfg: ModelConfig, batch: int, max_seq: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.num_layers, self.max_seq = cfg.num_layers, max_seq
        self.sliding_window = cfg.sliding_window
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_seq, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)

    def read(self, layer: int, kv_len: int | None):
        """Keys and values of positions [0, kv_len), as views (B, Hkv, kv_len, D)."""
        n = self.max_seq if kv_len is None else kv_len
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n]

    @property
    def bytes_per_token(self) -> int:
        b, h, _, d = self.k.shape[1:]
        return 2 * self.num_layers * b * h * d * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


CACHE_CLASSES: dict[int, type] = {16: DenseKVCache}


def create_cache(bits: int, cfg: ModelConfig, batch: int, max_seq: int, dtype: torch.dtype,
                 device) -> "DenseKVCache":
    """A cache of `bits` (16, 8 or 4) for `max_seq` positions."""
    if bits not in CACHE_CLASSES:
        raise KVCacheError(f"KV cache bits must be one of {sorted(CACHE_CLASSES)}, not {bits}")
    return CACHE_CLASSES[bits](cfg, batch, max_seq, dtype, device)
