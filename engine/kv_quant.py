"""int8 and int4 KV caches: only quantized bytes and their scales (+ a 32-token 16-bit key window).

Both keep DenseKVCache's interface (update, bytes_per_token, nbytes) and preallocate every buffer
with the position axis S in the same place as the dense cache, (L, B, Hkv, S, ...), so a decode
step writes one token's bytes and touches nothing else. Attention over them is
engine/kernels/attention_quantized_reference.py.

Scales are fp16, whatever the model dtype. fp32 scales would miss the memory targets at head_dim 64
(int8: 2*(64+4)/256 = 0.531x of bf16; int4: 84/256 = 0.328x); bf16 has fp32's range but an 8-bit
mantissa. fp16's 11-bit mantissa rounds a scale by at most 0.05%, and codes are computed against
the rounded scale, so that rounding costs nothing; its range (6e-8 .. 65504) holds |x| up to
8e6 at int8. A scale that underflows to 0 (a token or group with |x| < 4e-6) stores exact zeros.

Writes must be sequential per layer (the normal prefill-then-decode order, or a restart at a
multiple of 32): a write that begins inside a 32-token key group takes the group's earlier keys
from the 16-bit residual window, which holds only the group in progress.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.engine.kv_cache import CACHE_CLASSES, KVCacheError
from lowbit.quant.architecture import ModelConfig
from lowbit.quant.primitives import dequantize_affine, pack_int4, quantize_affine, unpack_int4

SCALE_DTYPE = torch.float16
# Key quantization group along the token axis and value group along head_dim (issue 3: keys per
# channel over 32 tokens with a 16-bit residual measured +0.8% perplexity, per-token keys +4.6%).
KEY_GROUP = 32
VALUE_GROUP = 32
# int8 values are stored transposed in tiles of this many positions (Int8KVCache); int4 values in
# tiles of one key group, two positions a byte (Int4KVCache).
VALUE_TILE = 64
INT4_VALUE_TILE = KEY_GROUP
# Positions kept in 16-bit (keys and values) at the start of the sequence, where attention sinks
# live. Measured on the default model (4 windows of 1024 tokens of the news corpus, fp32): int4
# +1.66% perplexity without, +0.87% with 4 sink tokens, +1.01% with 32 (values dominate the int4
# error: relative squared error 0.0071 vs keys 0.0019, and the sink draws much of the attention).
# Off by default (the gain above is measured on one small model); the Triton decode kernel and
# the one-token write read and write k_sink / v_sink, matching the reference.
DEFAULT_SINK_TOKENS = 0


def _quantize_rows(x: Tensor, bits: int, group: int, symmetric: bool):
    """x (N, K) → codes (N, K), fp16 scales (N, G), zeros (N, G) uint8 or None, by the shared
    affine primitive; a group whose fp16 scale underflowed to 0 is stored as exact zeros."""
    q, scale, zero = quantize_affine(x, bits, group, symmetric, SCALE_DTYPE)
    dead = scale == 0  # (N, G)
    if dead.any():
        codes_dead = dead.repeat_interleave(group, dim=1)[:, :x.shape[1]]
        q = q.masked_fill(codes_dead, 0)
        scale = scale.masked_fill(dead, 1.0)
        if zero is not None:
            zero = zero.masked_fill(dead, 0)
    return q, scale, zero


def _exact(numerator: int, denominator: int) -> int | float:
    return numerator // denominator if numerator % denominator == 0 else numerator / denominator


class _QuantizedCache:
    """Shared bookkeeping: sizes, position checks, byte counts."""

    bits: int

    def __init__(self, cfg: ModelConfig, batch: int, max_seq: int, dtype: torch.dtype,
                 device: torch.device | str):
        if max_seq < 1:
            raise KVCacheError(f"a KV cache needs at least one position, not {max_seq}")
        self.num_layers, self.max_seq = cfg.num_layers, max_seq
        self.sliding_window = cfg.sliding_window
        self.batch, self.num_kv_heads, self.head_dim = batch, cfg.num_kv_heads, cfg.head_dim
        self.dtype, self.device = dtype, torch.device(device)

    def _first_position(self, positions: Tensor, k: Tensor) -> int:
        """positions (T,) are contiguous; returns positions[0] after checking they fit."""
        t = k.shape[2]
        if positions.shape != (t,):
            raise KVCacheError(f"positions of shape {tuple(positions.shape)} do not match {t} new "
                               f"tokens")
        first = int(positions[0])
        if first < 0 or first + t > self.max_seq:
            raise KVCacheError(f"positions {first}..{first + t - 1} do not fit this {self.bits}-bit "
                               f"KV cache of {self.max_seq} positions; create a longer cache")
        return first

    def _tensors(self) -> list[Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors())


class Int8KVCache(_QuantizedCache):
    """Symmetric int8, one fp16 scale per (layer, batch, kv head, position) over head_dim.

    Layout (all contiguous; Sv = S rounded up to a multiple of VALUE_TILE = 64):
      k                  int8    (L, B, Hkv, S, D)              codes in [-127, 127]
      v                  int8    (L, B, Hkv, Sv/64, D, 64)      codes, transposed per tile of 64
                                                                positions: v[.., s // 64, c, s % 64]
      k_scale, v_scale   float16 (L, B, Hkv, S)
      key[l, b, h, s, c] = k[l, b, h, s, c] * k_scale[l, b, h, s]
      value[l, b, h, s, c] = v[l, b, h, s // 64, c, s % 64] * v_scale[l, b, h, s]
    Values are transposed because the decode kernel's P.V product reduces over positions: a
    tensor-core operand register holds consecutive positions of one channel, which the tiles
    store side by side (16-byte loads), where a position-major layout would need one byte load
    per code (measured: 64 LDS.U8 of the 93 shared-memory loads per 64 positions).
    A token is quantized when written, so every later read sees the same bytes.
    bytes_per_token = 2 * L * B * Hkv * (D + 2): 0.516x of bf16 at D = 64, 0.508x at D = 128
    (exact when S is a multiple of 64; the tile padding adds at most 63 positions of values).
    """

    bits = 8

    def __init__(self, cfg, batch, max_seq, dtype, device):
        super().__init__(cfg, batch, max_seq, dtype, device)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_seq, cfg.head_dim)
        tiles = -(-max_seq // VALUE_TILE)
        self.k = torch.zeros(shape, dtype=torch.int8, device=device)
        self.v = torch.zeros(*shape[:3], tiles, cfg.head_dim, VALUE_TILE, dtype=torch.int8,
                             device=device)
        self.k_scale = torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=device)
        self.v_scale = torch.zeros(shape[:-1], dtype=SCALE_DTYPE, device=device)

    def _value_rows(self, layer: int) -> Tensor:
        """The value codes of one layer as a position-major view (B, Hkv, Sv/64, 64, D)."""
        return self.v[layer].transpose(-1, -2)

    def _write_value_codes(self, layer: int, p0: int, codes: Tensor) -> None:
        """codes (B, Hkv, T, D) of positions p0 .. p0+T-1 into the tiles: the partial first and
        last tiles one by one, the whole tiles between as one strided copy."""
        rows = self._value_rows(layer)
        p1 = p0 + codes.shape[2]
        first = min(p1, -(-p0 // VALUE_TILE) * VALUE_TILE)  # end of p0's tile
        last = max(first, p1 // VALUE_TILE * VALUE_TILE)  # start of p1's partial tile
        if p0 < first:
            t, r = divmod(p0, VALUE_TILE)
            rows[:, :, t, r:r + first - p0] = codes[:, :, :first - p0]
        if first < last:
            b, h, _, d = codes.shape
            whole = codes[:, :, first - p0:last - p0].reshape(b, h, -1, VALUE_TILE, d)
            rows[:, :, first // VALUE_TILE:last // VALUE_TILE] = whole
        if last < p1:
            rows[:, :, last // VALUE_TILE, :p1 - last] = codes[:, :, last - p0:]

    def _read_value_codes(self, layer: int, n: int) -> Tensor:
        """Value codes of positions [0, n), (B, Hkv, n, D) (a copy)."""
        tiles = -(-n // VALUE_TILE)
        rows = self._value_rows(layer)[:, :, :tiles]  # (B, Hkv, tiles, 64, D)
        b, h, _, tile, d = rows.shape
        return rows.reshape(b, h, tiles * tile, d)[:, :, :n]

    @staticmethod
    def _quantize(x: Tensor) -> tuple[Tensor, Tensor]:
        b, h, t, d = x.shape
        q, scale, _ = _quantize_rows(x.reshape(-1, d), 8, d, symmetric=True)  # (B*Hkv*T, D)
        return q.view(b, h, t, d), scale.view(b, h, t)

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> None:
        # imported here: the kernels package imports this module for its reference attention
        from lowbit.engine.kernels.triton_kv_update import write_decode_token
        if write_decode_token(self, layer, positions, k, v):  # one token on CUDA: no host sync
            return
        p0 = self._first_position(positions, k)
        p1 = p0 + k.shape[2]
        self.k[layer, :, :, p0:p1], self.k_scale[layer, :, :, p0:p1] = self._quantize(k)
        codes, self.v_scale[layer, :, :, p0:p1] = self._quantize(v)
        self._write_value_codes(layer, p0, codes)

    def _dequantize(self, q: Tensor, scale: Tensor) -> Tensor:
        b, h, n, d = q.shape
        x = dequantize_affine(q.reshape(-1, d), scale.reshape(-1, 1), None, d, self.dtype)
        return x.view(b, h, n, d)

    def read(self, layer: int, kv_len: int | None) -> tuple[Tensor, Tensor]:
        """Dequantized keys and values of positions [0, kv_len) (None: all), (B, Hkv, n, D) in the
        model dtype: temporaries of one layer, never kept."""
        n = self.max_seq if kv_len is None else kv_len
        return (self._dequantize(self.k[layer, :, :, :n], self.k_scale[layer, :, :, :n]),
                self._dequantize(self._read_value_codes(layer, n), self.v_scale[layer, :, :, :n]))

    def _tensors(self):
        return [self.k, self.v, self.k_scale, self.v_scale]

    @property
    def bytes_per_token(self) -> int:
        return _exact(self.nbytes, self.max_seq)


class Int4KVCache(_QuantizedCache):
    """Asymmetric int4: keys per channel over 32-token groups (+ a 16-bit window for the group in
    progress), values per token in groups of 32 along head_dim. Dequantization is the weights'
    formula x = (u - z) * s with unsigned nibbles u and integer zeros z in [0, 15].

    Layout (all contiguous; Sk = S rounded up to a multiple of 32, Gk = Sk / 32, Gv = ceil(D / 32)):
      k_packed   uint8   (L, B, Hkv, Sk, D/2)   byte[.., s, j] = u[s, 2j] | u[s, 2j+1] << 4
      k_scale    float16 (L, B, Hkv, Gk, D)     key[s, c] = (u[s, c] - k_zero[s//32, c])
      k_zero     uint8   (L, B, Hkv, Gk, D)                 * k_scale[s//32, c]
      k_residual dtype   (L, B, Hkv, 32, D)     16-bit key of position 32*g + j at slot j, for the
                                                group g in progress (not yet 32 keys)
      v_packed   uint8   (L, B, Hkv, Gk, D, 16) values transposed per tile of 32 positions and
                                                packed along positions: byte[.., s//32, c, j] =
                                                u[32(s//32) + 2j, c] | u[32(s//32) + 2j+1, c] << 4
      v_scale    float16 (L, B, Hkv, S, Gv)     value[s, c] = (u[s, c] - v_zero[s, c//32])
      v_zero     uint8   (L, B, Hkv, S, Gv)                   * v_scale[s, c//32]
      k_sink, v_sink dtype (L, B, Hkv, sink_tokens, D)  16-bit keys and values of positions
                                                [0, sink_tokens), read instead of their bytes
    Key bytes of group g are valid once its 32 keys are written (then they are quantized at once);
    until then the group lives in k_residual.

    Keys are packed along head_dim, like values and like int4 weights along their reduction
    dimension: a decode kernel loads a (BLOCK_N, D/2) tile of one key block (rows of D/2 contiguous
    bytes, coalesced), and since one block of 32 tokens shares a (D,) scale and zero, it computes
    q.k = sum_c (q_c s_c) u_c - sum_c q_c s_c z_c: q is scaled once per group, low nibbles meet
    the even channels of q*s and high nibbles the odd ones, so no nibble is ever interleaved and K
    is never dequantized. Values are transposed, like the int8 cache's, because the P.V product
    reduces over positions: a tensor-core operand register holds consecutive positions of one
    channel, which a tile stores in consecutive nibbles (low nibbles: even positions, high: odd),
    so a warp's 32 positions are one contiguous 2 KB block at D = 128 and need no shuffles.

    bytes_per_token (steady state, scales and zeros included, the 16-bit residual window and sink
    excluded: they are a fixed (32 + 2 * sink_tokens) * D * 2 bytes per layer and head, see
    residual_nbytes):
      L * B * Hkv * (D/2 + 3*D/32 + D/2 + 3*Gv) = 76 per layer and head at D = 64 (0.297x of bf16),
      152 at D = 128 (0.297x).
    """

    bits = 4

    def __init__(self, cfg, batch, max_seq, dtype, device,
                 sink_tokens: int = DEFAULT_SINK_TOKENS):
        super().__init__(cfg, batch, max_seq, dtype, device)
        d = cfg.head_dim
        if d % 2:
            raise KVCacheError(f"an int4 KV cache packs two values per byte and needs an even "
                               f"head_dim, not {d}")
        lead = (cfg.num_layers, batch, cfg.num_kv_heads)
        groups = -(-max_seq // KEY_GROUP)
        value_groups = -(-d // VALUE_GROUP)
        kw = {"device": device}
        self.k_packed = torch.zeros(*lead, groups * KEY_GROUP, d // 2, dtype=torch.uint8, **kw)
        self.k_scale = torch.zeros(*lead, groups, d, dtype=SCALE_DTYPE, **kw)
        self.k_zero = torch.zeros(*lead, groups, d, dtype=torch.uint8, **kw)
        self.k_residual = torch.zeros(*lead, KEY_GROUP, d, dtype=dtype, **kw)
        self.v_packed = torch.zeros(*lead, groups, d, INT4_VALUE_TILE // 2, dtype=torch.uint8,
                                    **kw)
        self.v_scale = torch.zeros(*lead, max_seq, value_groups, dtype=SCALE_DTYPE, **kw)
        self.v_zero = torch.zeros(*lead, max_seq, value_groups, dtype=torch.uint8, **kw)
        self.sink_tokens = min(sink_tokens, max_seq)
        self.k_sink = torch.zeros(*lead, self.sink_tokens, d, dtype=dtype, **kw)
        self.v_sink = torch.zeros(*lead, self.sink_tokens, d, dtype=dtype, **kw)
        # (layer, first position, keys (B, Hkv, p0 % 32, D)) of the latest update: the 16-bit
        # keys of its group written before it. The chunk's tail may overwrite them in k_residual,
        # yet the chunk's first queries must still see them unquantized. <= 31 keys of one layer.
        self.chunk_prior: tuple[int, int, Tensor] | None = None

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> None:
        # imported here: the kernels package imports this module for its reference attention
        from lowbit.engine.kernels.triton_kv_update import write_decode_token
        if write_decode_token(self, layer, positions, k, v):  # one token on CUDA: no host sync
            return
        p0 = self._first_position(positions, k)
        self._write_values(layer, p0, v)
        self._write_keys(layer, p0, k)
        sink = max(0, min(self.sink_tokens - p0, k.shape[2]))
        if sink:
            self.k_sink[layer, :, :, p0:p0 + sink] = k[:, :, :sink]
            self.v_sink[layer, :, :, p0:p0 + sink] = v[:, :, :sink]

    def _write_values(self, layer: int, p0: int, v: Tensor) -> None:
        b, h, t, d = v.shape
        u, scale, zero = _quantize_rows(v.reshape(-1, d), 4, VALUE_GROUP, symmetric=False)
        p1 = p0 + t
        t0, t1 = p0 // INT4_VALUE_TILE, -(-p1 // INT4_VALUE_TILE)
        # the tiles p0 .. p1 touch, read back so the nibbles of other positions are kept
        nibbles = self._value_nibbles(layer, t0, t1)  # (B, Hkv, (t1-t0)*32, D)
        r0 = p0 - t0 * INT4_VALUE_TILE
        nibbles[:, :, r0:r0 + t] = u.view(b, h, t, d)
        tiles = nibbles.view(b, h, t1 - t0, INT4_VALUE_TILE, d).transpose(-1, -2)  # (.., D, 32)
        self.v_packed[layer, :, :, t0:t1] = pack_int4(tiles)
        self.v_scale[layer, :, :, p0:p1] = scale.view(b, h, t, -1)
        self.v_zero[layer, :, :, p0:p1] = zero.view(b, h, t, -1)

    def _value_nibbles(self, layer: int, t0: int, t1: int) -> Tensor:
        """Value codes of tiles [t0, t1) position-major, (B, Hkv, (t1-t0)*32, D) uint8 (a copy)."""
        tiles = unpack_int4(self.v_packed[layer, :, :, t0:t1])  # (B, Hkv, t1-t0, D, 32)
        b, h, nt, d, tile = tiles.shape
        return tiles.transpose(-1, -2).reshape(b, h, nt * tile, d)

    def _write_keys(self, layer: int, p0: int, k: Tensor) -> None:
        g0, r0 = divmod(p0, KEY_GROUP)
        residual = self.k_residual[layer]  # (B, Hkv, 32, D)
        prior = residual[:, :, :r0].clone()
        self.chunk_prior = (layer, p0, prior)
        span = torch.cat((prior, k.to(residual.dtype)), dim=2)  # positions 32*g0 .. p1
        full = span.shape[2] // KEY_GROUP
        if full:
            self._store_key_groups(layer, g0, span[:, :, :full * KEY_GROUP])
        tail = span[:, :, full * KEY_GROUP:]
        residual[:, :, :tail.shape[2]] = tail

    def _store_key_groups(self, layer: int, g0: int, keys: Tensor) -> None:
        """keys (B, Hkv, G*32, D) of complete groups g0 .. g0+G-1 → codes, scales, zeros."""
        b, h, n, d = keys.shape
        g = n // KEY_GROUP
        per_channel = keys.view(b, h, g, KEY_GROUP, d).transpose(3, 4)  # (B, Hkv, G, D, 32)
        u, scale, zero = _quantize_rows(per_channel.reshape(-1, KEY_GROUP), 4, KEY_GROUP,
                                        symmetric=False)  # (B*Hkv*G*D, 32), (.., 1), (.., 1)
        u = u.view(b, h, g, d, KEY_GROUP).transpose(3, 4).reshape(b, h, n, d)  # (B, Hkv, G*32, D)
        s0 = g0 * KEY_GROUP
        self.k_packed[layer, :, :, s0:s0 + n] = pack_int4(u)
        self.k_scale[layer, :, :, g0:g0 + g] = scale.view(b, h, g, d)
        self.k_zero[layer, :, :, g0:g0 + g] = zero.view(b, h, g, d)

    def dequantized_keys(self, layer: int, n: int) -> Tensor:
        """Keys of positions [0, n) as stored quantized, (B, Hkv, n, D) in the model dtype. Only
        positions of complete groups are meaningful; a temporary of one layer, never kept."""
        g = -(-n // KEY_GROUP)
        b, h, d = self.batch, self.num_kv_heads, self.head_dim
        u = unpack_int4(self.k_packed[layer, :, :, :g * KEY_GROUP])  # (B, Hkv, G*32, D)
        u = u.view(b, h, g, KEY_GROUP, d).transpose(3, 4).reshape(-1, KEY_GROUP)  # (B*Hkv*G*D, 32)
        x = dequantize_affine(u, self.k_scale[layer, :, :, :g].reshape(-1, 1),
                              self.k_zero[layer, :, :, :g].reshape(-1, 1), KEY_GROUP, self.dtype)
        x = x.view(b, h, g, d, KEY_GROUP).transpose(3, 4).reshape(b, h, g * KEY_GROUP, d)
        return x[:, :, :n]

    def dequantized_values(self, layer: int, n: int) -> Tensor:
        """Values of positions [0, n), (B, Hkv, n, D) in the model dtype (a temporary)."""
        b, h, d = self.batch, self.num_kv_heads, self.head_dim
        tiles = -(-n // INT4_VALUE_TILE)
        u = self._value_nibbles(layer, 0, tiles)[:, :, :n].reshape(-1, d)  # (B*Hkv*n, D)
        gv = self.v_scale.shape[-1]
        x = dequantize_affine(u, self.v_scale[layer, :, :, :n].reshape(-1, gv),
                              self.v_zero[layer, :, :, :n].reshape(-1, gv), VALUE_GROUP,
                              self.dtype)
        return x.view(b, h, n, d)

    def _tensors(self):
        return [self.k_packed, self.k_scale, self.k_zero, self.k_residual, self.v_packed,
                self.v_scale, self.v_zero, self.k_sink, self.v_sink]

    @property
    def residual_nbytes(self) -> int:
        """Fixed 16-bit bytes: the key window of the group in progress and the sink tokens."""
        return self.k_residual.nbytes + self.k_sink.nbytes + self.v_sink.nbytes

    @property
    def bytes_per_token(self) -> int | float:
        per_group = (self.k_packed.nbytes + self.k_scale.nbytes + self.k_zero.nbytes
                     + self.v_packed.nbytes)  # sized by Sk = S rounded up to 32 positions
        per_position = self.v_scale.nbytes + self.v_zero.nbytes
        sk = self.k_packed.shape[3]
        # exact when D % 16 == 0 (every real model): per_group / Sk + per_position / S
        return _exact(per_group * self.max_seq + per_position * sk, sk * self.max_seq)


CACHE_CLASSES[8] = Int8KVCache
CACHE_CLASSES[4] = Int4KVCache
