"""Triton int8 dequant_matmul against the fp64 reference (dequantize, then matmul).

On CPU the kernels run in the Triton interpreter (set before triton is imported), fp16/fp32 only
(the interpreter's bf16 arithmetic is wrong). The GPU suite runs the same checks at Llama-3-8B
shapes in bf16/fp16 when CUDA is there and the interpreter is off (TRITON_INTERPRET=0).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels import registry, triton_backend  # noqa: E402,F401  (registers)
from lowbit.engine.kernels.triton_common import Plan  # noqa: E402
from lowbit.engine.kernels.triton_int8_matmul import int8_matmul  # noqa: E402
from lowbit.quant.formats import Int8Weight  # noqa: E402
from helpers import triton_gpu_only  # noqa: E402

# relative Frobenius error bounds: fp32 runs exact codes through an IEEE dot; fp16 rounds the
# output (and, with scale_in_tile, each weight) to 11 bits; bf16 to 8 bits.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

on_gpu = triton_gpu_only()


def _weight(n, k, gs, dtype, device="cpu"):
    w = torch.randn(n, k, device=device, dtype=torch.float32)
    return Int8Weight.quantize(w.to(dtype), gs)


def _reference(x, weight, bias):
    out = x.double() @ weight.dequantize(torch.float64).T
    return out if bias is None else out + bias.double()


def _rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has unwritten (NaN-poisoned) elements"
    return ((out.double() - ref).norm() / ref.norm()).item()


def _run(weight, m, dtype, bias, plan, device="cpu"):
    k, n = weight.in_features, weight.out_features
    x = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    out = torch.full((m, n), float("nan"), device=device, dtype=dtype)  # poison
    int8_matmul(x, weight, b, out, plan)
    return _rel_err(out, _reference(x, weight, b))


# (N, K, group (None = per-channel), M, plan): every variant on odd shapes; K=202 is not a
# multiple of 4 (padded words), K=200/gs 64 has a ragged 8-column last group.
CASES = [
    (48, 96, None, 1, Plan("gemv", block_m=1, block_n=16, block_k=32, split_k=2)),
    (48, 202, None, 3, Plan("gemv", block_m=2, block_n=32)),
    (48, 200, 64, 1, Plan("gemv", block_m=1, block_n=32, split_k=3)),
    (48, 160, 32, 2, Plan("gemv", block_m=2, block_n=64, split_k=1)),
    (48, 202, None, 3, Plan("gemv", block_m=2, block_n=16, split_k=2, prefetch=True)),
    (48, 200, 64, 1, Plan("gemv", block_m=1, block_n=32, prefetch=True)),
    # the plane layout (W = block_k / 4): per-channel with K % chunk != 0 and a padded row
    # tile (N = 40), grouped with two groups per chunk (g32, W 8) and a ragged last group
    (40, 202, None, 1, Plan("planes", block_m=1, block_n=32, block_k=64, prefetch=True)),
    (48, 200, 64, 3, Plan("planes", block_m=2, block_n=16, block_k=32, split_k=2)),
    (48, 160, 32, 2, Plan("planes", block_m=2, block_n=32, block_k=64, split_k=1)),
    (48, 202, None, 17, Plan("dot", block_m=16, block_n=32, split_k=3)),
    (48, 200, 64, 3, Plan("dot", block_m=16, block_n=16, split_k=2)),
    (48, 96, 32, 17, Plan("dot", block_m=16, block_n=32, scale_in_tile=True)),
    (48, 202, None, 1, Plan("tc", block_m=8, block_n=32, block_k=64, split_k=3)),
    (48, 200, 64, 3, Plan("tc", block_m=8, block_n=16, split_k=1)),
    (40, 160, 32, 17, Plan("tc", block_m=16, block_n=32, split_k=2)),
    (48, 200, 64, 17, Plan("dequant")),
    (48, 202, None, 3, Plan("dequant")),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,k,gs,m,plan", CASES, ids=[str(c[-1]) for c in CASES])
def test_int8_kernels_match_reference(n, k, gs, m, plan, dtype):
    torch.manual_seed(n * k + m)
    weight = _weight(n, k, gs, dtype)
    assert _run(weight, m, dtype, bias=m % 2 == 1, plan=plan) < TOL[dtype]


@pytest.mark.parametrize("gs", [None, 32], ids=["per-channel", "g32"])
def test_dequant_path_in_row_pieces(monkeypatch, gs):
    """A layer wider than the scratch goes through it in pieces of 64 rows (150 = 64 + 64 + 22)."""
    from lowbit.engine.kernels import triton_common
    monkeypatch.setattr(triton_common, "SCRATCH_BYTES", 64 * 96 * 4)
    torch.manual_seed(12)
    weight = _weight(150, 96, gs, torch.float32)
    assert _run(weight, 17, torch.float32, bias=True, plan=Plan("dequant")) < TOL[torch.float32]


def test_dispatch_keeps_leading_dims():
    torch.manual_seed(2)
    weight = _weight(48, 202, None, torch.float16)
    x = torch.randn(4, 1, 202, dtype=torch.float16)
    with registry.use_backend("triton"):
        out = registry.dispatch("dequant_matmul", x, weight, None)
    assert out.shape == (4, 1, 48)
    ref = _reference(x.reshape(4, 202), weight, None).reshape(4, 1, 48)
    assert _rel_err(out, ref) < TOL[torch.float16]


# (N, K, dtype): every Llama-3-8B shape in bf16, fp16 on one
GPU_SHAPES = [(4096, 4096, torch.bfloat16), (14336, 4096, torch.bfloat16),
              (4096, 14336, torch.bfloat16), (4096, 4096, torch.float16)]


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,dtype", GPU_SHAPES,
                         ids=[f"{n}x{k}-{str(d)[6:]}" for n, k, d in GPU_SHAPES])
@pytest.mark.parametrize("gs", [None, 128], ids=["per-channel", "g128"])
def test_int8_gpu_default_plans(n, k, gs, dtype):
    torch.manual_seed(n + k)
    weight = _weight(n, k, gs, dtype, device="cuda")
    for m in (1, 2, 5, 16, 64, 300):
        assert _run(weight, m, dtype, bias=m == 5, plan=None, device="cuda") < TOL[dtype], m


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("plan", [Plan("gemv", block_m=2, block_n=128),
                                  Plan("gemv", block_m=1, block_n=64, prefetch=True, waves=8),
                                  Plan("planes", block_m=1, block_n=256, block_k=32),
                                  Plan("planes", block_m=2, block_n=128, block_k=64),
                                  Plan("dot", block_m=16, block_n=128, split_k=4),
                                  Plan("dot", block_m=128, block_n=128, num_warps=8,
                                       num_stages=3),
                                  Plan("tc", block_m=8, block_n=128, num_stages=3),
                                  Plan("tc", block_m=16, block_n=64, split_k=4),
                                  Plan("dequant")], ids=str)
def test_int8_gpu_every_path(plan, dtype):
    torch.manual_seed(7)
    weight = _weight(4096, 4096, None, dtype, device="cuda")
    m = {"gemv": plan.block_m, "planes": plan.block_m, "tc": plan.block_m - 3}.get(plan.path, 200)
    assert _run(weight, m, dtype, bias=True, plan=plan, device="cuda") < TOL[dtype]
