"""A model of the tensor cores' fp32 accumulation for the Triton interpreter, whose tl.dot is a
numpy matmul (round to nearest, so it hides what the GPU's accumulation does).

The model (an H100's 16-bit HMMA as measured by its effect): per k-step of 16 products, the
products are exact, every term (the 16 products and the accumulator) is aligned to the largest
one's exponent and truncated toward zero to 24 + 2 bits, the terms are summed exactly and the sum
truncated toward zero to fp32. Truncation is biased: when every term is positive (a dot of
probabilities against codes biased by +1152, say) each step loses ~ulp(accumulator) in the same
direction, so the loss grows with the accumulator and adds up over steps. Calibration: on
bench_attention's random int8 cache (Llama-3-8B head, 128 warps) this model gives the old kernel
a relative error of 2.6e-3 at 32k and 2.5e-2 at 128k; the H100 measured 2.6e-3 (above bf16's
2.2e-3 floor) and 2.6e-2.

    with tensor_core_rounding():
        out = decode_attention(...)  # 16-bit dots accumulate as modelled; fp32 dots unchanged

The model sees only the accumulator passed to tl.dot. The GPU compiler also folds
`acc + tl.dot(a, b)` into the dot's accumulator, the interpreter does not: a kernel passes its
running accumulator to tl.dot explicitly (the same IR on the GPU) so the model can see it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import triton.language as tl
from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

K_STEP = 16
EXTRA_BITS = 2


def _truncate_fp32(x: np.ndarray) -> np.ndarray:
    """float64 -> the fp32 value toward zero (24 significant bits), as float64."""
    mant, exp = np.frexp(x)  # x = mant * 2**exp, 0.5 <= |mant| < 1
    return np.ldexp(np.trunc(np.ldexp(mant, 24)), exp - 24)


def mma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """c + a @ b as the model accumulates it: a (..., M, K), b (..., K, N) 16-bit, c (..., M, N)
    fp32 -> fp32."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    acc = c.astype(np.float64)
    for k0 in range(0, a.shape[-1], K_STEP):
        prods = a64[..., :, k0:k0 + K_STEP, None] * b64[..., None, k0:k0 + K_STEP, :]
        terms = np.concatenate((acc[..., :, None, :], prods), axis=-2)  # (..., M, 1 + k, N)
        _, exp = np.frexp(np.abs(terms).max(axis=-2, keepdims=True))
        quantum = np.ldexp(1.0, exp - (24 + EXTRA_BITS))
        # 17 terms of <= 26 bits below a common exponent: their float64 sum is exact
        acc = _truncate_fp32((np.trunc(terms / quantum) * quantum).sum(axis=-2))
    return acc.astype(np.float32)


@contextlib.contextmanager
def tensor_core_rounding():
    """Inside: the interpreter's fp16 x fp16 -> fp32 tl.dot follows `mma`."""
    plain = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype != tl.float16 or b.dtype != tl.float16 or d.dtype != tl.float32:
            return plain(self, a, b, d, input_precision, max_num_imprecise_acc)
        return TensorHandle(mma(a.data, b.data, d.data), tl.float32)

    InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        InterpreterBuilder.create_dot = plain
