"""Triton silu_mul (silu(gate) * up from the fused gate_up output) against the torch reference.

On CPU the kernel runs in the Triton interpreter (fp16/fp32 only: its bf16 arithmetic is wrong);
the gpu-marked test runs Llama-3-8B's intermediate size (14336) in bf16 and fp16 on CUDA.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels import elementwise_reference as ref  # noqa: E402
from lowbit.engine.kernels import dispatch, use_backend  # noqa: E402
from lowbit.engine.kernels.triton_silu_mul import silu_mul  # noqa: E402
from helpers import rel_err, triton_gpu_only  # noqa: E402

# relative Frobenius error against the reference (same two roundings; exp's last bits differ).
# Measured worst (interpreter, these shapes and (64, 2*14336)): fp32 2.8e-8, fp16 3.2e-6.
# The 16-bit bounds are a quarter of an ulp (2^-10 fp16, 2^-7 bf16), relative.
TOL = {torch.float32: 1e-6, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}

on_gpu = triton_gpu_only()


def gate_up(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return (3 * torch.randn(shape, generator=gen, device=device)).to(dtype)


# intermediate 300 (one partial block), 1536, 1500 (two blocks, the second partial), 7
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 600), (1, 1, 3072), (5, 3000), (2, 1, 14)])
def test_silu_mul_matches_reference(shape, dtype):
    x = gate_up(shape, dtype)
    out_shape = (*shape[:-1], shape[-1] // 2)
    poisoned = torch.full(out_shape, float("nan"), dtype=dtype)
    got = silu_mul(x, out=poisoned)
    assert got is poisoned
    assert rel_err(got, ref.silu_mul(x)) < TOL[dtype]


def test_halves_are_gate_then_up():
    """Zero up: the output is zero whatever the gate; the order engine/fuse.py stacks them in."""
    x = gate_up((3, 64), torch.float32, seed=1)
    x[:, 32:] = 0
    assert torch.equal(silu_mul(x), torch.zeros(3, 32))


def test_strided_rows_and_dispatch():
    wide = gate_up((4, 5, 700), torch.float32, seed=2)
    x = wide[..., :600]  # rows 700 apart
    with use_backend("triton"):
        got = dispatch("silu_mul", x)
    with use_backend("reference"):
        want = dispatch("silu_mul", x)
    assert rel_err(got, want) < TOL[torch.float32]


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 512])
def test_gpu_llama3_intermediate(rows, dtype):
    x = gate_up((rows, 2 * 14336), dtype, device="cuda", seed=3)
    assert rel_err(silu_mul(x), ref.silu_mul(x)) < TOL[dtype]
