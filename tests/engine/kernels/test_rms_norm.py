"""Triton rms_norm and add_rms_norm against the torch reference (elementwise_reference).

On CPU the kernel runs in the Triton interpreter (fp16/fp32 only: its bf16 arithmetic is wrong);
the gpu-marked tests run Llama-3-8B's hidden size in bf16 and fp16 on CUDA.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels import elementwise_reference as ref  # noqa: E402
from lowbit.engine.kernels import dispatch, use_backend  # noqa: E402
from lowbit.engine.kernels.triton_rms_norm import add_rms_norm, rms_norm  # noqa: E402
from helpers import rel_err, triton_gpu_only  # noqa: E402

# relative Frobenius error of the kernel against the reference: the fp32 statistics differ only in
# summation order and rsqrt's last bits, which flips an occasional 16-bit rounding of the output
# by one ulp. Measured worst (interpreter, these shapes and (64, 4096), 3 seeds): fp32 1.3e-7,
# fp16 5.8e-6. The 16-bit bounds are a quarter of an ulp (2^-10 fp16, 2^-7 bf16), relative.
TOL = {torch.float32: 1e-6, torch.float16: 2.5e-4, torch.bfloat16: 2e-3}
EPS = 1e-5

on_gpu = triton_gpu_only()


def inputs(shape, dtype, device="cpu", seed=0, weight_dtype=None):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device).to(dtype)
    delta = torch.randn(shape, generator=gen, device=device).to(dtype)
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=gen, device=device))
    return x, delta, weight.to(weight_dtype or dtype)


SHAPES = [(2, 7, 200), (1, 1, 576), (5, 64), (2, 1, 37)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    x, _, w = inputs(shape, dtype)
    want = ref.rms_norm(x, w, EPS)
    poisoned = torch.full(shape, float("nan"), dtype=dtype)
    got = rms_norm(x, w, EPS, out=poisoned)
    assert got is poisoned and got.dtype == want.dtype
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_matches_reference(shape, dtype):
    x, delta, w = inputs(shape, dtype, seed=1)
    s_want, y_want = ref.add_rms_norm(x, delta, w, EPS)
    out = tuple(torch.full(shape, float("nan"), dtype=dtype) for _ in range(2))  # (s, y)
    s, y = add_rms_norm(x, delta, w, EPS, out=out)
    assert s is out[0] and y is out[1]
    assert torch.equal(s, s_want)  # one rounding of an exact fp32 sum, as torch's add
    assert rel_err(y, y_want) < TOL[dtype]


def test_strided_rows_and_promoted_weight():
    """Rows of a wider buffer (a view, not copied) and an fp32 weight on fp16 x (output fp32)."""
    x, delta, w = inputs((3, 5, 96), torch.float16, seed=2, weight_dtype=torch.float32)
    wide = torch.randn(3, 5, 160).half()
    wide[..., :96] = x
    view = wide[..., :96]
    got = rms_norm(view, w, EPS)
    assert got.dtype == torch.float32
    assert rel_err(got, ref.rms_norm(view, w, EPS)) < TOL[torch.float16]
    s, y = add_rms_norm(view, delta, w, EPS)
    s_want, y_want = ref.add_rms_norm(view, delta, w, EPS)
    assert torch.equal(s, s_want) and rel_err(y, y_want) < TOL[torch.float16]


def test_dispatch_forced_triton_and_reference():
    x, delta, w = inputs((2, 7, 200), torch.float32, seed=3)
    with use_backend("triton"):
        got = dispatch("rms_norm", x, w, EPS)
        s, y = dispatch("add_rms_norm", x, delta, w, EPS)
    with use_backend("reference"):
        assert torch.equal(dispatch("rms_norm", x, w, EPS), ref.rms_norm(x, w, EPS))
    assert rel_err(got, ref.rms_norm(x, w, EPS)) < TOL[torch.float32]
    assert torch.equal(s, x + delta) and rel_err(y, ref.rms_norm(x + delta, w, EPS)) < 1e-6


def test_bad_weight_shape_is_refused_with_reason():
    x, _, w = inputs((2, 8), torch.float32)
    from lowbit.engine.kernels.elementwise_backend import supports_rms_norm
    assert "does not match" in supports_rms_norm(x, w[:7], EPS)


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (2, 7, 4096), (1, 512, 4096)])
def test_gpu_llama3_hidden(shape, dtype):
    x, delta, w = inputs(shape, dtype, device="cuda", seed=4)
    assert rel_err(rms_norm(x, w, EPS), ref.rms_norm(x, w, EPS)) < TOL[dtype]
    s, y = add_rms_norm(x, delta, w, EPS)
    s_want, y_want = ref.add_rms_norm(x, delta, w, EPS)
    assert torch.equal(s, s_want) and rel_err(y, y_want) < TOL[dtype]
