"""KV-cache codes -> 16-bit tensor-core operands in a few integer instructions (inline PTX on the
GPU; the same values through plain Triton ops under the interpreter, which cannot run PTX).

The float-exponent trick: OR a small unsigned integer u into the low mantissa bits of a power of
two 2**e (with e >= bits of u) and the float is exactly 2**e + u. A decode kernel then feeds
these biased values to tl.dot and subtracts the bias times the sum of the other operand once
(per row for keys, per block for values): no per-element subtraction, scale or conversion.

Instructions per code (SASS, sm_90), against Triton's own int8 -> bf16 conversion at ~2.1 (LOP3,
PRMT, HADD2.BF16 per element, measured in the decode kernel's loop before this change):
- int8 -> fp16 1152 + s: one LOP3 per 4 codes (s xor 0x80 = s + 128 as an unsigned byte), one
  PRMT per 2 (bytes under the exponent byte 0x64 of 1024): 0.75;
- int4 -> 16-bit 2**e + u: see int4_biased.

Element order: Triton hands each asm call 4 consecutive elements of a thread's registers packed
into one 32-bit word (pack=4, the byte of element i at bits 8i..8i+7) and expects 4 16-bit
results back as two words, element i in the half i % 2 of word i // 2.
"""
from __future__ import annotations

import triton
import triton.language as tl

# 1024 + 128: int8_biased(s) = s + INT8_BIAS, exactly, in fp16 (a constexpr: jit code reads it)
INT8_BIAS = tl.constexpr(1152.0)


@triton.jit
def int8_biased(x, ASM: tl.constexpr):
    """int8 codes s -> fp16 s + 1152 (exact)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 $0, t, 0x64646464, 0x5140;
            prmt.b32 $1, t, 0x64646464, 0x7362;
            }""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return (x.to(tl.int16) + 1152).to(tl.float16)
