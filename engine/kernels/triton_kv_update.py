"""Sync-free write of one decode token into the int8 / int4 KV caches (one launch per layer).

The caches' torch update reads positions[0] on the host and quantizes with ~10 small torch ops
per tensor; inside a CUDA-graph decode step a host read breaks the capture, and ~20 launches per
layer x 32 layers would cost ~1 ms per token. Here one program per (batch, KV head) reads the
position on the device and writes exactly the bytes the torch path writes (same fp32 formulas,
IEEE division, round-half-to-even, fp16 scales, an underflowed scale stored as exact zeros):
- int8: codes + one fp16 scale per token for k and v (value codes into their 64-position
  transposed tile);
- int4: the value row (nibbles into their transposed 32-position tile, each byte read, its own
  nibble replaced and written back; fp16 scale and integer zero per 32 channels); the 16-bit key
  into residual slot pos % 32, and when that slot is 31 the whole group, now complete, is
  quantized per channel from the window and written to k_packed / k_scale / k_zero; a position
  below sink_tokens also into the 16-bit k_sink / v_sink.
Positions are not range-checked on the device; callers check on the host where they can.
The same launch can first do the token's rotary (ROTATE, rotary_decode_write): each program
rotates its KV head's query group and key with triton_rotary's arithmetic, so a quantized cache
costs no launch beyond the dense cache's rotary-and-write.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from .triton_common import await_inputs, next_power_of_2, pdl_options
    from .triton_rotary import _rotate_heads, _unit_stride
    _missing = None
except ImportError as e:  # triton is optional: the caches then keep their torch update
    _missing = f"triton is not importable ({e})"


if _missing is None:
    @triton.jit
    def _rint(x):
        """Round half to even, exactly (torch.round): x - floor(x) is exact in fp32."""
        f = tl.floor(x)
        d = x - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        up = (d > 0.5) | ((d == 0.5) & odd)
        return tl.where(up, f + 1.0, f)

    @triton.jit
    def _int8_row(x_ptr, q_ptr, s_ptr, D: tl.constexpr, CODE_STRIDE: tl.constexpr):
        """Symmetric int8 of one (D,) row: q = rint(x / s), s = fp16(absmax / 127); code c is
        stored at q_ptr + c * CODE_STRIDE."""
        offs = tl.arange(0, D)
        x = tl.load(x_ptr + offs).to(tl.float32)
        s = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 127.0)
        s16 = tl.where(s > 0, s, 1.0).to(tl.float16)
        dead = s16 == 0  # fp16 underflow: stored as scale 1, codes 0
        s32 = tl.where(dead, 1.0, s16.to(tl.float32))
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s32)), -127.0), 127.0)
        tl.store(q_ptr + offs * CODE_STRIDE, tl.where(dead, 0.0, q).to(tl.int8))
        tl.store(s_ptr, s32.to(tl.float16))

    @triton.jit
    def _rotate_group(q_ptr, kin_ptr, cos_ptr, sin_ptr, qo_ptr, k_row, b, h, stride_qb,
                      stride_kinb, HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                      G_P: tl.constexpr):
        """Rotary of one decode token's query heads h*G .. h*G + G-1 (q (B, 1, H*D) -> qo
        (B, 1, H, D)) and key head h (kin (B, 1, Hkv*D) -> k_row), with triton_rotary's own
        arithmetic; cos, sin (1, D). The key row is read back by other threads: a barrier."""
        HALF: tl.constexpr = D // 2
        cols = tl.arange(0, HALF)[None, :]
        c1 = tl.load(cos_ptr + cols).to(tl.float32)
        c2 = tl.load(cos_ptr + HALF + cols).to(tl.float32)
        s1 = tl.load(sin_ptr + cols).to(tl.float32)
        s2 = tl.load(sin_ptr + HALF + cols).to(tl.float32)
        _rotate_heads(q_ptr + b * stride_qb + h * (G * D), qo_ptr + (b * HKV + h) * (G * D), G,
                      c1, c2, s1, s2, D, HALF, G_P, HALF)
        _rotate_heads(kin_ptr + b * stride_kinb + h * D, k_row, 1, c1, c2, s1, s2, D, HALF, 1,
                      HALF)
        tl.debug_barrier()

    @triton.jit
    def _int8_write_kernel(k_ptr, v_ptr, pos_ptr, kq_ptr, vq_ptr, ks_ptr, vs_ptr,
                           q_ptr, kin_ptr, cos_ptr, sin_ptr, qo_ptr,
                           stride_kb, stride_kh, stride_vb, stride_vh, S, stride_vqh,
                           stride_qb, stride_kinb, HKV: tl.constexpr, D: tl.constexpr,
                           VT: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr,
                           ROTATE: tl.constexpr, PDL: tl.constexpr):
        """Keys (B*Hkv, S, D); values (B*Hkv, S/VT, D, VT) with bh stride stride_vqh. ROTATE:
        the key is first rotated into k_ptr's row, with the group's queries (_rotate_group)."""
        await_inputs(PDL)
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        if ROTATE:
            _rotate_group(q_ptr, kin_ptr, cos_ptr, sin_ptr, qo_ptr,
                          k_ptr + b * stride_kb + h * stride_kh, b, h, stride_qb, stride_kinb,
                          HKV, D, G, G_P)
        pos = tl.load(pos_ptr)
        row = bh.to(tl.int64) * S + pos  # (B*Hkv, S) index of the new token
        vrow = bh.to(tl.int64) * stride_vqh + (pos // VT) * (VT * D) + pos % VT
        _int8_row(k_ptr + b * stride_kb + h * stride_kh, kq_ptr + row * D, ks_ptr + row, D, 1)
        _int8_row(v_ptr + b * stride_vb + h * stride_vh, vq_ptr + vrow, vs_ptr + row, D, VT)

    @triton.jit
    def _asym4(x, axis: tl.constexpr):
        """Asymmetric 4-bit codes of x reduced over `axis` -> (u, fp16 scale, zero), the
        primitives' formulas: s = (max(hi, 0) - min(lo, 0)) / 15, z = rint(-lo / s)."""
        lo = tl.minimum(tl.min(x, axis=axis), 0.0)
        hi = tl.maximum(tl.max(x, axis=axis), 0.0)
        s = tl.math.div_rn(hi - lo, 15.0)
        s16 = tl.where(s > 0, s, 1.0).to(tl.float16)
        dead = tl.expand_dims(s16 == 0, axis)  # fp16 underflow: scale 1, codes and zero 0
        s32 = tl.where(dead, 1.0, tl.expand_dims(s16.to(tl.float32), axis))
        z = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-tl.expand_dims(lo, axis), s32)), 0.0),
                       15.0)
        u = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x, s32)) + z, 0.0), 15.0)
        return tl.where(dead, 0.0, u), s32, tl.where(dead, 0.0, z)

    @triton.jit
    def _pack_pairs(u, R: tl.constexpr, C: tl.constexpr):
        """(R, C) codes in [0, 15] -> (R, C/2) bytes, column 2j in the low nibble."""
        pairs = tl.reshape(u.to(tl.int32), (R, C // 2, 2))
        return tl.sum(pairs << (4 * tl.arange(0, 2)[None, None, :]), axis=2).to(tl.uint8)

    @triton.jit
    def _int4_write_kernel(k_ptr, v_ptr, pos_ptr, kp_ptr, ks_ptr, kz_ptr, kr_ptr,
                           vp_ptr, vs_ptr, vz_ptr, ksink_ptr, vsink_ptr,
                           q_ptr, kin_ptr, cos_ptr, sin_ptr, qo_ptr,
                           stride_kb, stride_kh, stride_vb, stride_vh,
                           stride_kp, stride_kg, stride_kr, stride_vp, stride_vg, stride_sink,
                           stride_qb, stride_kinb, HKV: tl.constexpr, D: tl.constexpr,
                           GV: tl.constexpr, SINK: tl.constexpr, G: tl.constexpr,
                           G_P: tl.constexpr, ROTATE: tl.constexpr, PDL: tl.constexpr):
        """Values: the row viewed as (GV, 32), one group of 32 channels a row, stored into the
        tile (D, 16) of pos // 32. Keys: the residual window (32 tokens, D), one group of 32
        tokens per channel. Sinks (SINK > 0): (SINK, D) rows per (batch, head). ROTATE: as the
        int8 kernel."""
        await_inputs(PDL)
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        if ROTATE:
            _rotate_group(q_ptr, kin_ptr, cos_ptr, sin_ptr, qo_ptr,
                          k_ptr + b * stride_kb + h * stride_kh, b, h, stride_qb, stride_kinb,
                          HKV, D, G, G_P)
        bh64 = bh.to(tl.int64)
        pos = tl.load(pos_ptr)
        og = tl.arange(0, GV)
        oc = tl.arange(0, 32)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + og[:, None] * 32 + oc[None, :])
        u, s, z = _asym4(v.to(tl.float32), 1)  # (GV, 32), (GV, 1), (GV, 1)
        # byte (pos % 32) // 2 of channel c's row in the tile, low nibble for an even position
        cell = (vp_ptr + bh64 * stride_vp + (pos // 32) * (D * 16) + (og[:, None] * 32
                + oc[None, :]) * 16 + (pos % 32) // 2)  # (GV, 32)
        shift = 4 * (pos % 2)
        kept = tl.load(cell).to(tl.int32) & (0xF0 >> shift)
        tl.store(cell, (kept | (u.to(tl.int32) << shift)).to(tl.uint8))
        tl.store(vs_ptr + bh64 * stride_vg + pos * GV + og[:, None], s.to(tl.float16))
        tl.store(vz_ptr + bh64 * stride_vg + pos * GV + og[:, None], z.to(tl.uint8))
        r = pos % 32
        offs_d = tl.arange(0, D)
        k_row = k_ptr + b * stride_kb + h * stride_kh
        res = kr_ptr + bh64 * stride_kr
        tl.store(res + r * D + offs_d, tl.load(k_row + offs_d))
        if SINK > 0:
            if pos < SINK:
                sink_row = bh64 * stride_sink + pos * D
                tl.store(ksink_ptr + sink_row + offs_d, tl.load(k_row + offs_d))
                tl.store(vsink_ptr + sink_row + og[:, None] * 32 + oc[None, :], v)
        if r == 31:
            ot = tl.arange(0, 32)
            window = tl.load(res + ot[:, None] * D + offs_d[None, :]).to(tl.float32)  # (32, D)
            fresh = tl.load(k_row + offs_d).to(tl.float32)
            window = tl.where(ot[:, None] == r, fresh[None, :], window)  # own row, not re-read
            ku, kscale, kzero = _asym4(window, 0)  # (32, D), (1, D), (1, D)
            grp = pos // 32
            jj = tl.arange(0, D // 2)
            tl.store(kp_ptr + bh64 * stride_kp + (grp * 32 + ot[:, None]) * (D // 2)
                     + jj[None, :], _pack_pairs(ku, 32, D))
            gbase = bh64 * stride_kg + grp * D + offs_d[None, :]
            tl.store(ks_ptr + gbase, kscale.to(tl.float16))
            tl.store(kz_ptr + gbase, kzero.to(tl.uint8))


def supports_decode_write(cache, k: torch.Tensor) -> str | None:
    """None if the sync-free write can run for this cache and key, else why not."""
    if _missing is not None:
        return _missing
    d = k.shape[-1]
    if d < 32 or d & (d - 1):
        return f"head_dim {d} is not a power of two >= 32"
    if k.stride(-1) != 1:
        return "the new keys' last dimension is not contiguous"
    return None


def decode_write(cache, layer: int, positions: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, rotate: tuple | None = None) -> None:
    """Write k, v (B, Hkv, 1, D) of the token at positions[0] (a device tensor) into `cache`
    (Int8KVCache or Int4KVCache) without reading the position on the host.

    rotate = (q (B, 1, H*D), raw k (B, 1, Hkv*D), cos, sin (1, D), q_out (B, 1, H, D)): the same
    launch first rotates q into q_out and the raw k into k, which must then be a (B, Hkv, 1, D)
    view of a (B, 1, Hkv, D) buffer (rotary_decode_write)."""
    from lowbit.engine.kv_quant import Int4KVCache, Int8KVCache

    b, hkv, _, d = k.shape
    grid = (b * hkv,)
    if v.stride(-1) != 1:
        v = v.contiguous()
    if rotate is None:
        heads = hkv
        rot = (k, k, k, k, k, 0, 0)  # never read: ROTATE is off
    else:
        q, k_in, cos, sin, q_out = rotate
        heads = q.shape[-1] // d
        rot = (q, k_in, cos, sin, q_out, q.stride(0), k_in.stride(0))
    group = dict(G=heads // hkv, G_P=next_power_of_2(heads // hkv), ROTATE=rotate is not None)
    if isinstance(cache, Int8KVCache):
        _int8_write_kernel[grid](
            k, v, positions, cache.k[layer], cache.v[layer], cache.k_scale[layer],
            cache.v_scale[layer], *rot[:5], k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cache.max_seq, cache.v.stride(2), *rot[5:], HKV=hkv, D=d, VT=cache.v.shape[-1],
            num_warps=1, **group, **pdl_options(k.device))
    elif isinstance(cache, Int4KVCache):
        kp, ks, kz = cache.k_packed[layer], cache.k_scale[layer], cache.k_zero[layer]
        kr, vp = cache.k_residual[layer], cache.v_packed[layer]
        vs, vz = cache.v_scale[layer], cache.v_zero[layer]
        k_sink, v_sink = cache.k_sink[layer], cache.v_sink[layer]
        _int4_write_kernel[grid](
            k, v, positions, kp, ks, kz, kr, vp, vs, vz, k_sink, v_sink, *rot[:5],
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kp.stride(1), ks.stride(1), kr.stride(1), vp.stride(1), vs.stride(1),
            k_sink.stride(1), *rot[5:], HKV=hkv, D=d, GV=vs.shape[-1], SINK=cache.sink_tokens,
            num_warps=4, **group, **pdl_options(k.device))
    else:
        raise TypeError(f"no sync-free decode write for {type(cache).__name__}")


def write_decode_token(cache, layer: int, positions: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, rotate: tuple | None = None) -> bool:
    """The caches' fast path: a one-token write on CUDA goes through `decode_write` and returns
    True; anything else (prefill chunks, CPU, no triton) returns False for the torch update.

    Outside CUDA-graph capture the position is still read once on the host, as the torch path
    does, to range-check it and to record the int4 cache's chunk_prior (the reference attention
    needs it; it cannot run inside a graph anyway). During capture neither can be done."""
    if k.shape[2] != 1 or not k.is_cuda or supports_decode_write(cache, k) is not None:
        return False
    capturing = torch.cuda.is_current_stream_capturing()
    p0 = None if capturing else cache._first_position(positions, k)
    decode_write(cache, layer, positions, k, v, rotate)
    if hasattr(cache, "chunk_prior"):
        cache.chunk_prior = None if capturing else (
            layer, p0, cache.k_residual[layer, :, :, :p0 % 32].clone())
    return True


def rotary_decode_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, cache, layer: int, positions: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rotary of one decode token and its int8 / int4 cache write in one launch: q (B, 1, H*D)
    and k (B, 1, Hkv*D) as the qkv projection returns them, v (B, Hkv, 1, D), cos / sin (1, D)
    -> rotated q (B, H, 1, D) and k (B, Hkv, 1, D), as triton_rotary.rotary returns them. None
    where it cannot run (prefill chunks, CPU, other caches): then rotary and cache.update.
    One launch a layer fewer than rotary + decode_write (H100, Llama-3-8B shape at 1k: the write
    kernels took 75-78 us of a 3.4 ms token, 32 launches; end to end about +1% at 1k and 32k)."""
    from lowbit.engine.kv_quant import Int4KVCache, Int8KVCache

    if q.shape[1] != 1 or not q.is_cuda or not isinstance(cache, (Int8KVCache, Int4KVCache)):
        return None
    b, d = q.shape[0], cos.shape[-1]
    h, hkv = q.shape[-1] // d, k.shape[-1] // d
    q_out = torch.empty((b, 1, h, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, 1, hkv, d), dtype=k.dtype, device=k.device).transpose(1, 2)
    rotate = (_unit_stride(q), _unit_stride(k), cos.contiguous(), sin.contiguous(), q_out)
    if not write_decode_token(cache, layer, positions, k_out, v, rotate):
        return None
    return q_out.transpose(1, 2), k_out
