"""Importance-weighted scale and zero-point search: per group, the candidate (s, z) that minimises

    E(s, z) = Σ_k a_k · (w_k − (c_k − z)·s)²,   c_k = clamp(round(w_k / s) + z, cmin, cmax)

where a_k ≥ 0 is the importance of input column k (the mean of x_k² over calibration
activations: for one output row, E is then that row's mean squared output error if input columns
were uncorrelated). Codes stay round-to-nearest given (s, z) — a per-element choice the weights
cannot change — so the search only moves the grid: clipping ratios, integer zero points beside the
centred one, and closed-form least-squares refits of s with the codes held.

Round-to-nearest's own (s, z) is always a candidate and evaluated first, so the result is never
worse than RTN on E (ties keep RTN). Scales are rounded to their storage dtype before codes are
computed and errors measured: the error minimised is the error of what is stored.

Code conventions (c is what this module computes; the formats store it as documented there):
  int4 asymmetric  c = u ∈ [0, 15], integer z ∈ [0, 15]
  int4 symmetric   c ∈ [−8, 7], z = 0 (stored as u = c + 8)
  int8             c ∈ [−127, 127], z = 0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .formats import INT4_SYMMETRIC_ZERO, Int4Weight, Int8Weight, _scale_dtype
from .primitives import QuantizationError, _check, num_groups, pack_int4, symmetric_range

# Clipping ratios tried for each group: the grid spans ratio × the group's range (widened to 0).
# Measured on the default model's layers 0-2 (21 linears, int4 g128, importance from 4096
# calibration tokens), weighted error relative to RTN's: these 17 ratios with 2 refits 0.617;
# 33 ratios 0.617; 9 ratios 0.619; 25 ratios from 0.3 0.617; the single ratio 1.0 0.668.
DEFAULT_RATIOS = tuple(torch.linspace(0.5, 1.05, 17).tolist())
# Closed-form refits of s after the grid: 0 refits 0.626, 1 0.618, 2 0.617, 3 0.617 (as above).
REFIT_ROUNDS = 2
# Elements per chunk of rows: bounds the search's temporaries (~10 fp32 tensors of this size).
# CPU: a 1536x576 search took 0.24 s in chunks of 2^18, 0.77 s in one of 2^21 (cache-resident or
# not). GPU: large chunks keep kernel launches few (~400 a chunk); 2^24 is ~640 MB of temporaries.
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if bits not in (4, 8):
        raise QuantizationError(f"only 4- and 8-bit codes are supported, not {bits}")
    if symmetric or bits == 8:
        return symmetric_range(bits)
    return 0, (1 << bits) - 1


def _grouped(t: Tensor, group_size: int) -> Tensor:
    """(..., K) → (..., G, gs) fp32, the ragged last group zero-padded."""
    k = t.shape[-1]
    pad = num_groups(k, group_size) * group_size - k
    t = t.float()
    if pad:
        t = F.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], -1, group_size)


def _check_importance(importance: Tensor | None, k: int, device) -> Tensor:
    if importance is None:
        return torch.ones(k, device=device)
    if importance.shape != (k,):
        raise QuantizationError(f"importance must have one value per input column ({k}), got "
                                f"shape {tuple(importance.shape)}")
    if not torch.isfinite(importance).all() or (importance < 0).any():
        raise QuantizationError("importance must be finite and non-negative")
    return importance.float().to(device)


class _GroupSearch:
    """Best (s, z) so far for a chunk of groups, and the error of each candidate.

    wg (R, G, gs) weights, a (G, gs) importance (0 on the ragged padding), scale_dtype the dtype
    scales are stored in; s and z (R, G) fp32 (z integral)."""

    def __init__(self, wg: Tensor, a: Tensor, cmin: int, cmax: int, scale_dtype: torch.dtype):
        self.wg, self.a, self.cmin, self.cmax, self.scale_dtype = wg, a, cmin, cmax, scale_dtype
        shape = wg.shape[:-1]
        self.err = torch.full(shape, float("inf"), device=wg.device)
        self.s = torch.ones(shape, device=wg.device)
        self.z = torch.zeros(shape, device=wg.device)

    def stored(self, s: Tensor) -> Tensor:
        """s rounded to the storage dtype and back; non-positive or non-finite → 1 (any positive
        scale reproduces an all-zero group)."""
        s = s.to(self.scale_dtype).float()
        return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))

    def codes(self, s: Tensor, z: Tensor) -> Tensor:
        codes = torch.round(self.wg / s.unsqueeze(-1)) + z.unsqueeze(-1)
        return codes.clamp(self.cmin, self.cmax)

    def consider(self, s: Tensor, zs: list[Tensor]) -> None:
        """Evaluate candidates (s, z) for each z in `zs` (s already stored-rounded) and keep each
        where it is better. clamp(round(w/s) + z, cmin, cmax) − z = clamp(round(w/s), cmin − z,
        cmax − z), so the rounding is shared by every z: 2 + 4·len(zs) passes over the chunk."""
        s3 = s.unsqueeze(-1)
        rounded = torch.round(self.wg / s3)
        for z in zs:
            z3 = z.unsqueeze(-1)
            q = rounded.clamp(min=self.cmin - z3, max=self.cmax - z3)  # c − z
            d = torch.addcmul(self.wg, q, s3, value=-1)
            err = torch.einsum("rgk,gk->rg", d.square_(), self.a)
            better = err < self.err
            self.err = torch.where(better, err, self.err)
            self.s = torch.where(better, s, self.s)
            self.z = torch.where(better, z, self.z)

    def refit_scale(self, z: Tensor) -> Tensor:
        """The least-squares s for the current best codes with zero point z:
        s = Σ a·w·(c − z) / Σ a·(c − z)²."""
        q = self.codes(self.s, self.z) - z.unsqueeze(-1)
        num = (self.a * self.wg * q).sum(-1)
        den = (self.a * q * q).sum(-1)
        return self.stored(torch.where(den > 0, num / den.clamp_min(1e-30), self.s))


def _search_chunk(wg: Tensor, a: Tensor, cmin: int, cmax: int, symmetric: bool,
                  scale_dtype: torch.dtype, ratios) -> tuple[Tensor, Tensor]:
    g = _GroupSearch(wg, a, cmin, cmax, scale_dtype)
    if symmetric:
        zero = [torch.zeros_like(g.err)]
        absmax = wg.abs().amax(-1)
        # round-to-nearest first (primitives._symmetric_scale): absmax/8 for int4, /127 for int8
        g.consider(g.stored(absmax / -cmin if cmin == -8 else absmax / cmax), zero)
        for r in ratios:
            g.consider(g.stored(absmax * r / cmax), zero)
            if cmin != -cmax:
                g.consider(g.stored(absmax * r / -cmin), zero)
        for _ in range(REFIT_ROUNDS):
            g.consider(g.refit_scale(zero[0]), zero)
        return g.s, g.z
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    s = g.stored((hi - lo) / cmax)
    g.consider(s, [torch.round(-lo / s).clamp(cmin, cmax)])  # round-to-nearest, exactly
    mid = (lo + hi) / 2
    for r in ratios:
        s = g.stored((hi - lo) * r / cmax)
        z0 = torch.round((cmax / 2) - mid / s)
        g.consider(s, [(z0 + dz).clamp(cmin, cmax) for dz in (-1, 0, 1)])
    for _ in range(REFIT_ROUNDS):
        for dz in (-1, 0, 1):
            z = (g.z + dz).clamp(cmin, cmax)
            g.consider(g.refit_scale(z), [z])
    return g.s, g.z


def search_params(w: Tensor, importance: Tensor | None, bits: int, group_size: int,
                  symmetric: bool, scale_dtype: torch.dtype, ratios=DEFAULT_RATIOS
                  ) -> tuple[Tensor, Tensor]:
    """Per-group scale and zero point for w (N, K) minimising the importance-weighted error.

    Returns (scale (N, G) in scale_dtype, zero (N, G) fp32 holding integers; all 0 when
    symmetric). importance (K,) ≥ 0, or None for the unweighted search (all ones).
    """
    _check(w, bits, group_size)
    n, k = w.shape
    cmin, cmax = code_range(bits, symmetric)
    a = _grouped(_check_importance(importance, k, w.device), group_size)  # (G, gs)
    rows = max(1, CHUNK_ELEMENTS.get(w.device.type, 1 << 18) // a.numel())
    scales, zeros = [], []
    for r0 in range(0, n, rows):
        wg = _grouped(w[r0:r0 + rows], group_size)  # (R, G, gs)
        s, z = _search_chunk(wg, a, cmin, cmax, symmetric or bits == 8, scale_dtype, ratios)
        scales.append(s)
        zeros.append(z)
    return torch.cat(scales).to(scale_dtype), torch.cat(zeros)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                   symmetric: bool) -> Tensor:
    """Round-to-nearest codes (N, K) fp32 of w (N, K) against fixed per-group (scale, zero)."""
    cmin, cmax = code_range(bits, symmetric)
    k = w.shape[-1]
    s = scale.float().repeat_interleave(group_size, -1)[..., :k]
    z = zero.float().repeat_interleave(group_size, -1)[..., :k]
    return (torch.round(w.float() / s) + z).clamp(cmin, cmax)


def to_format(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int | None,
              symmetric: bool) -> Int4Weight | Int8Weight:
    """Codes (N, K) in this module's convention, scales (N, G) in their storage dtype and zero
    points (N, G) → the canonical on-disk format. int8 with group_size None is per channel."""
    k = codes.shape[1]
    if bits == 8:
        return Int8Weight(codes.to(torch.int8).contiguous(), scale.contiguous(), group_size)
    if symmetric:
        u = codes + INT4_SYMMETRIC_ZERO
        return Int4Weight(pack_int4(u.to(torch.uint8)), scale.contiguous(), None, group_size, k,
                          True)
    return Int4Weight(pack_int4(codes.to(torch.uint8)), scale.contiguous(),
                      zero.to(torch.uint8).contiguous(), group_size, k, False)


def search_quantize(w: Tensor, importance: Tensor | None, bits: int = 4,
                    group_size: int | None = 128, symmetric: bool = False,
                    scale_dtype: torch.dtype | None = None) -> Int4Weight | Int8Weight:
    """w (N, K) → Int4Weight/Int8Weight whose (s, z) minimise Σ importance·(w − ŵ)² per group.

    importance (K,) is the mean of x² per input column (None: unweighted). group_size None means
    per output channel (int8 only). Scales are stored in `scale_dtype` (default: w's dtype)."""
    if bits == 4 and w.dim() == 2 and w.shape[1] % 2:
        raise QuantizationError(f"int4 needs an even number of input features, got {w.shape[1]}")
    if bits == 4 and group_size is None:
        raise QuantizationError("int4 needs a group size")
    sdt = _scale_dtype(w, scale_dtype)
    block = group_size or w.shape[-1]
    scale, zero = search_params(w, importance, bits, block, symmetric, sdt)
    codes = quantize_codes(w, scale, zero, bits, block, symmetric or bits == 8)
    return to_format(codes, scale, zero, bits, group_size, symmetric or bits == 8)


def weighted_error(w: Tensor, w_hat: Tensor, importance: Tensor | None = None) -> float:
    """Σ_{n,k} importance_k · (w − ŵ)², in fp64: the objective `search_quantize` minimises."""
    d = (w.double() - w_hat.double()) ** 2
    if importance is not None:
        d = d * importance.double()
    return float(d.sum())
