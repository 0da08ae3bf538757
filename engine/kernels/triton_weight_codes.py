"""Weight bytes -> biased 16-bit tensor-core operands (triton_gemv_tc.py): inline PTX on the GPU,
the same values through plain Triton ops under the interpreter (which cannot run PTX) and for
fp32 activations.

The float-exponent trick (see triton_kv_codes.py): a nibble u OR-ed into the mantissa of a power
of two lands as an exact 2**e + u when its lowest bit is worth 1 there. Every code comes out as
BIAS + u with one BIAS per activation dtype, and the matmul takes BIAS * sum(x) off once per
K-chunk in fp32 (triton_gemv_tc.py says why that is accurate): no per-code subtraction.

- bf16 (7 mantissa bits): 128 = 0x4300 has a step of 1, so a nibble in bits 0..3 of a half
  lands as 128 + u; the high nibble of a byte (bits 4..7) would reach the exponent's lowest bit
  (bit 7), so it is shifted down first.
- fp16 (10 mantissa bits): 64 = 0x5400 has a step of 1/16, so a nibble in bits 4..7 lands as
  64 + u: the high nibble as it is, the low one shifted up. (The low nibble under 1024 = 0x6400
  would need no shift, but a bias of 1024 against codes of ~8 leaves the fp32 chunk sums ~16x
  less headroom than 64.)
Per two bytes (four codes): one PRMT spreading bytes 0 and 1 to bits 0 and 16, two LOP3 (mask,
OR the exponent), one shift: 1 instruction a code, against ~3 for mask, I2F and scale.

int8 bytes are nibble pairs too: s + 128 = 16 h + l with h, l in [0, 15] (one XOR of the sign
bit), so sum(s x) = sum(l x) + 16 sum(h x) - 128 sum(x): two tensor-core dots per chunk on the
same activations, the high nibbles' result weighted 16 in fp32. bf16 cannot hold s + 128 in one code (8 significant bits are
needed with a bias); fp16 could, but one converter for both dtypes keeps one kernel path.

Element order: with pack=2 Triton hands each asm call two consecutive elements of a thread's
registers in the low 16 bits of one word (byte i at bits 8i..8i+7) and expects two 16-bit
results in one word, element i in half i. Each output element comes from the input byte of the
same index, so the result does not depend on which register layout Triton picked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def code_bias(dtype: torch.dtype) -> float:
    """The bias every code carries for activations of `dtype`: fp32 codes are plain nibbles
    (exact without the trick; a bias would only cost fp32 cancellation)."""
    return {torch.float16: 64.0, torch.bfloat16: 128.0}.get(dtype, 0.0)


def _asm(flip: str, shift: str, mask: str, exponent: str) -> tl.constexpr:
    """One converter: optional sign flip, bytes 0 and 1 to bits 0 and 16, optional shift, then
    mask and OR the exponent in (LOP3 0xEA: (a & b) | c)."""
    return tl.constexpr("{ .reg .b32 b, t; " + flip + " prmt.b32 t, b, 0, 0x4140; " + shift
                        + f" lop3.b32 $0, t, {mask}, {exponent}, 0xEA; }}")


_KEEP, _FLIP = "mov.b32 b, $1;", "xor.b32 b, $1, 0x8080;"
_F16_LOW = ("shl.b32 t, t, 4;", "0x00F000F0", "0x54005400")
_F16_HIGH = ("", "0x00F000F0", "0x54005400")
_BF16_LOW = ("", "0x000F000F", "0x43004300")
_BF16_HIGH = ("shr.b32 t, t, 4;", "0x000F000F", "0x43004300")
F16_LOW, F16_HIGH = _asm(_KEEP, *_F16_LOW), _asm(_KEEP, *_F16_HIGH)
BF16_LOW, BF16_HIGH = _asm(_KEEP, *_BF16_LOW), _asm(_KEEP, *_BF16_HIGH)
F16_LOW_I8, F16_HIGH_I8 = _asm(_FLIP, *_F16_LOW), _asm(_FLIP, *_F16_HIGH)
BF16_LOW_I8, BF16_HIGH_I8 = _asm(_FLIP, *_BF16_LOW), _asm(_FLIP, *_BF16_HIGH)


@triton.jit
def _asm_codes(q, x, LOW: tl.constexpr, HIGH: tl.constexpr):
    low = tl.inline_asm_elementwise(asm=LOW.value, constraints="=r,r", args=[q], dtype=x.dtype,
                                    is_pure=True, pack=2)
    high = tl.inline_asm_elementwise(asm=HIGH.value, constraints="=r,r", args=[q],
                                     dtype=x.dtype, is_pure=True, pack=2)
    return low, high


@triton.jit
def nibble_codes(q, x, BIAS: tl.constexpr, INT8: tl.constexpr, ASM: tl.constexpr):
    """uint8 bytes -> (low nibble + BIAS, high nibble + BIAS) in x's dtype, exactly, BIAS =
    code_bias(x's dtype); for int8 (INT8) the byte's sign bit is flipped first so the nibbles are
    those of s + 128. ASM: dtype is fp16 or bf16 and the kernel runs on the GPU."""
    if ASM:
        if x.dtype == tl.float16:
            if INT8:
                return _asm_codes(q, x, F16_LOW_I8, F16_HIGH_I8)
            else:
                return _asm_codes(q, x, F16_LOW, F16_HIGH)
        else:
            if INT8:
                return _asm_codes(q, x, BF16_LOW_I8, BF16_HIGH_I8)
            else:
                return _asm_codes(q, x, BF16_LOW, BF16_HIGH)
    else:
        if INT8:
            q = q ^ 0x80
        return (((q & 15).to(tl.float32) + BIAS).to(x.dtype),
                ((q >> 4).to(tl.float32) + BIAS).to(x.dtype))
