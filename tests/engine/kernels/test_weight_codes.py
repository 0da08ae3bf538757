"""triton_weight_codes.nibble_codes: every byte value to its two biased codes, exactly.

On CPU the plain-Triton path runs in the interpreter (fp32, fp16); on the GPU the inline PTX
converters (fp16, bf16) are checked against the same expected values.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from lowbit.engine.kernels.triton_weight_codes import code_bias, nibble_codes  # noqa: E402
from helpers import triton_gpu_only  # noqa: E402

on_gpu = triton_gpu_only()


@triton.jit
def _codes_kernel(q_ptr, x_ptr, low_ptr, high_ptr, BIAS: tl.constexpr, INT8: tl.constexpr,
                  ASM: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    q = tl.load(q_ptr + offs)
    x = tl.load(x_ptr + offs)  # only its dtype is used
    low, high = nibble_codes(q, x, BIAS, INT8, ASM)
    tl.store(low_ptr + offs, low)
    tl.store(high_ptr + offs, high)


def _check(dtype, int8, asm, device):
    q = torch.randperm(512, device=device).remainder(256).to(torch.uint8).view(16, 32)
    x = torch.zeros(16, 32, dtype=dtype, device=device)
    low, high = torch.empty_like(x), torch.empty_like(x)
    bias = code_bias(dtype)
    _codes_kernel[(1,)](q, x, low, high, BIAS=bias, INT8=int8, ASM=asm, R=16, C=32)
    b = (q ^ 0x80) if int8 else q  # int8: the nibbles of s + 128
    assert torch.equal(low.double(), (b & 15).double() + bias)
    assert torch.equal(high.double(), (b >> 4).double() + bias)


@pytest.mark.parametrize("int8", [False, True], ids=["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_plain_codes_of_every_byte(dtype, int8):
    _check(dtype, int8, asm=False, device="cpu")


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True], ids=["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ptx_codes_of_every_byte(dtype, int8):
    _check(dtype, int8, asm=True, device="cuda")
