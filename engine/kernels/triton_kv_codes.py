"""KV-cache codes -> 16-bit tensor-core operands in a few integer instructions (inline PTX on the
GPU; the same values through plain Triton ops under the interpreter, which cannot run PTX).

The float-exponent trick: OR a small unsigned integer u into the low mantissa bits of a power of
two 2**e (with e >= bits of u) and the float is exactly 2**e + u. A decode kernel then feeds
these biased values to tl.dot and subtracts the bias times the sum of the other operand once per
row (keys): no per-element subtraction, scale or conversion.

Instructions per code (SASS, sm_90), against Triton's own int8 -> bf16 conversion at ~2.1 (LOP3,
PRMT, HADD2.BF16 per element, measured in the decode kernel's loop before this change):
- int8 -> fp16 1152 + s: one LOP3 per 4 codes (s xor 0x80 = s + 128 as an unsigned byte), one
  PRMT per 2 (bytes under the exponent byte 0x64 of 1024): 0.75;
- int4 byte -> two fp16, 1024 + low nibble and 64 + high nibble: one PRMT per 2 bytes (bytes 0
  and 1 of the word to bits 0 and 16), one LOP3 per 2 codes ((t & 0x000F000F) | 0x64006400: 1024
  has a mantissa step of 1, so the low nibble lands as an integer; (t & 0x00F000F0) | 0x54005400:
  64 has a step of 1/16, so the high nibble in bits 4..7 lands as one too): 0.75 a code.

Centered variants (int8_signed, int4_centered) add one HADD2 per 2 codes (1.25 instructions a
code) and take the bias off in fp16, exactly (|code| <= 128 is an integer fp16 holds): the
operand of the P.V dot, whose accumulator runs over a warp's whole range of positions. Biased,
it would hold 1152 * sum(P) (int8; 1024 * sum(P) for int4) against a signal |sum(P * code)|
that grows only as sqrt(n): ~16 sqrt(n) times larger for uniform int8 codes, ~160 sqrt(n) for
int4. An H100's HMMA truncates each k-step's terms toward zero below the largest one's
exponent; with every term positive the loss is one-signed, ~ulp(accumulator) a step, and adds
up over the steps. Measured on an H100 (bench_attention, random int8 cache, output ~1/sqrt(n)):
relative error 2.6e-2 at 128k against bf16's 2.2e-3. Key dots keep the bias: a score's
accumulator spans D channels of one position, so the loss is a near-constant offset per query
row (per row and key group for int4), which softmax ignores, plus noise ~2^-20 of a score
(under tests/engine/kernels/tensor_core_rounding.py's model of the truncation, the kernels
with biased keys measure the same as with round-to-nearest dots).

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


@triton.jit
def int8_signed(x, ASM: tl.constexpr):
    """int8 codes s -> fp16 s (exact): int8_biased, then 1152 taken off in fp16 (HADD2)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, u, c;
            mov.b32 c, 0x64806480;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 u, t, 0x64646464, 0x5140;
            sub.f16x2 $0, u, c;
            prmt.b32 u, t, 0x64646464, 0x7362;
            sub.f16x2 $1, u, c;
            }""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return x.to(tl.float16)


# int4_biased's offsets, exact in fp16 (constexprs: jit code reads them)
INT4_LOW_BIAS = tl.constexpr(1024.0)
INT4_HIGH_BIAS = tl.constexpr(64.0)
# int4_centered's offset: nibbles u come out as u - 8 in [-8, 7]
INT4_CENTER = tl.constexpr(8.0)


def _int4_asm(mask: str, exponent: str, center: str | None) -> tl.constexpr:
    """Four fp16 codes of one nibble (low: mask 0x000F000F under 1024 = 0x6400; high: mask
    0x00F000F0 under 64 = 0x5400) from four bytes: PRMT bytes 0, 1 (then 2, 3) to bits 0 and 16,
    LOP3 (t & mask) | exponent; `center`, the fp16x2 bits of bias + 8, is then taken off."""
    regs, lines = ".reg .b32 t;", []
    if center:
        regs, lines = ".reg .b32 t, u, c;", [f"mov.b32 c, {center};"]
    for out, selector in ((0, "0x4140"), (1, "0x4342")):
        lines.append(f"prmt.b32 t, $2, 0, {selector};")
        if center:
            lines += [f"lop3.b32 u, t, {mask}, {exponent}, 0xEA;", f"sub.f16x2 ${out}, u, c;"]
        else:
            lines.append(f"lop3.b32 ${out}, t, {mask}, {exponent}, 0xEA;")
    return tl.constexpr("{\n" + "\n".join([regs] + lines) + "\n}")


INT4_LOW_ASM = _int4_asm("0x000F000F", "0x64006400", None)
INT4_HIGH_ASM = _int4_asm("0x00F000F0", "0x54005400", None)
INT4_LOW_CENTERED_ASM = _int4_asm("0x000F000F", "0x64006400", "0x64086408")  # 1032
INT4_HIGH_CENTERED_ASM = _int4_asm("0x00F000F0", "0x54005400", "0x54805480")  # 72


@triton.jit
def _int4_asm_pair(x, LOW: tl.constexpr, HIGH: tl.constexpr):
    """The two asm calls of one byte tensor; ptxas computes their shared PRMTs once."""
    low = tl.inline_asm_elementwise(asm=LOW.value, constraints="=r,=r,r", args=[x],
                                    dtype=tl.float16, is_pure=True, pack=4)
    high = tl.inline_asm_elementwise(asm=HIGH.value, constraints="=r,=r,r", args=[x],
                                     dtype=tl.float16, is_pure=True, pack=4)
    return low, high


@triton.jit
def int4_biased(x, ASM: tl.constexpr):
    """uint8 bytes (two nibbles) -> (fp16 1024 + low nibble, fp16 64 + high nibble), exact."""
    if ASM:
        return _int4_asm_pair(x, INT4_LOW_ASM, INT4_HIGH_ASM)
    else:
        return (((x & 15).to(tl.int16) + 1024).to(tl.float16),
                ((x >> 4).to(tl.int16) + 64).to(tl.float16))


@triton.jit
def int4_centered(x, ASM: tl.constexpr):
    """uint8 bytes -> (fp16 low nibble - 8, fp16 high nibble - 8), exact: int4_biased, then
    1032 = 0x6408 and 72 = 0x5480 taken off in fp16 (one HADD2 per 2 codes)."""
    if ASM:
        return _int4_asm_pair(x, INT4_LOW_CENTERED_ASM, INT4_HIGH_CENTERED_ASM)
    else:
        return (((x & 15).to(tl.int16) - 8).to(tl.float16),
                ((x >> 4).to(tl.int16) - 8).to(tl.float16))
