import pytest
import torch

from lowbit.engine.kernels import chosen, cpu_packed, dispatch, reference, use_backend
from lowbit.engine.kernels import BackendUnavailable
from lowbit.quant.formats import Int4Weight, Int8Weight

# relative error ||packed - reference|| / ||reference||; measured worst over these shapes:
# bf16 0.004, fp16 0.0004, fp32 3e-7 (the scale and tinygemm's float zero are rounded to x's dtype)
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DTYPES = list(TOL)


def _rel_err(y, ref):
    y, ref = y.float(), ref.float()
    return ((y - ref).norm() / ref.norm()).item()


INT4_CASES = [  # (N, K, gs): ragged K=576/gs 128 and K=200/gs 64 included
    (48, 576, 128), (16, 200, 64), (112, 96, 32), (32, 512, 256), (16, 640, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,gs", INT4_CASES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_reference(dtype, n, k, gs, symmetric):
    fmt = Int4Weight.quantize(torch.randn(n, k, dtype=dtype) * 0.05, gs, symmetric=symmetric)
    for lead in [(1,), (3,), (2, 17)]:
        x = torch.randn(*lead, k, dtype=dtype)
        bias = torch.randn(n, dtype=dtype)
        assert cpu_packed.can_run(x, fmt, bias) is None
        y = cpu_packed.dequant_matmul(x, fmt, bias)
        ref = reference.dequant_matmul(x, fmt, bias)
        assert y.shape == (*lead, n) and y.dtype == dtype
        assert _rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(7, 208), (96, 576), (33, 32)])
def test_int8_matches_reference(dtype, n, k):
    fmt = Int8Weight.quantize(torch.randn(n, k, dtype=dtype), None)
    for lead in [(1,), (5,), (3, 11)]:
        x = torch.randn(*lead, k, dtype=dtype)
        y = cpu_packed.dequant_matmul(x, fmt, None)
        assert _rel_err(y, reference.dequant_matmul(x, fmt, None)) < TOL[dtype]


def test_repack_computed_once_and_per_dtype():
    fmt = Int4Weight.quantize(torch.randn(32, 256), 64)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    cpu_packed.dequant_matmul(x, fmt)
    first = fmt.repacked[("cpu-packed", torch.bfloat16)]
    cpu_packed.dequant_matmul(x, fmt)
    assert fmt.repacked[("cpu-packed", torch.bfloat16)] is first
    cpu_packed.dequant_matmul(x.float(), fmt)
    assert set(fmt.repacked) == {("cpu-packed", torch.bfloat16), ("cpu-packed", torch.float32)}


@pytest.mark.parametrize("fmt,x,reason", [
    (Int8Weight.quantize(torch.randn(16, 128), 64), torch.randn(1, 128), "per-channel"),
    (Int8Weight.quantize(torch.randn(16, 200)), torch.randn(1, 200, dtype=torch.bfloat16),
     "K divisible by 16"),
    (Int4Weight.quantize(torch.randn(16, 128), 16), torch.randn(1, 128), "group size 16"),
    (Int4Weight.quantize(torch.randn(24, 128), 32), torch.randn(1, 128), "divisible by 16"),
    (Int4Weight.quantize(torch.randn(16, 128), 32), torch.randn(1, 64), "in_features=128"),
])
def test_constraints_reported(fmt, x, reason):
    assert reason in cpu_packed.can_run(x, fmt)
    with use_backend("cpu-packed"), pytest.raises(BackendUnavailable, match=reason):
        dispatch("dequant_matmul", x, fmt, None)


def test_auto_choice_follows_measurements():
    """bf16 decode goes to cpu-packed; fp32 and long prefill stay on the reference, saying why."""
    fmt = Int4Weight.quantize(torch.randn(48, 576, dtype=torch.bfloat16), 64)
    assert cpu_packed.supports(torch.randn(1, 576, dtype=torch.bfloat16), fmt) is None
    assert "measured slower" in cpu_packed.supports(torch.randn(1, 576), fmt)
    assert "measured slower" in cpu_packed.supports(torch.randn(65, 576, dtype=torch.bfloat16), fmt)
    before = chosen().get("dequant_matmul", {}).get("cpu/gemv", {}).get("cpu-packed", 0)
    y = dispatch("dequant_matmul", torch.randn(1, 7, 576, dtype=torch.bfloat16), fmt, None)
    assert y.shape == (1, 7, 48)
    assert chosen()["dequant_matmul"]["cpu/gemv"]["cpu-packed"] == before + 1
