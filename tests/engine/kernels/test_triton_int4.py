"""Triton int4 dequant_matmul against the fp64 reference (dequantize, then matmul).

On CPU the kernels run in the Triton interpreter (set before triton is imported), fp16/fp32 only
(the interpreter's bf16 arithmetic is wrong). The GPU suite runs the same checks at Llama-3-8B
shapes in bf16/fp16 when CUDA is there and the interpreter is off (TRITON_INTERPRET=0).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels import registry  # noqa: E402
from lowbit.engine.kernels.triton_backend import dequant_matmul, supports  # noqa: E402
from lowbit.engine.kernels.triton_common import Plan  # noqa: E402
from lowbit.engine.kernels.triton_int4_matmul import int4_matmul  # noqa: E402
from lowbit.quant.formats import Int4Weight  # noqa: E402
from helpers import triton_gpu_only  # noqa: E402

# relative Frobenius error bounds: fp32 runs exact codes through an IEEE dot; fp16 rounds the
# output (and, with scale_in_tile, each weight) to 11 bits; bf16 to 8 bits.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

on_gpu = triton_gpu_only()


def _weight(n, k, gs, symmetric, dtype, device="cpu"):
    w = torch.randn(n, k, device=device, dtype=torch.float32)
    return Int4Weight.quantize(w.to(dtype), gs, symmetric=symmetric)


def _reference(x, weight, bias):
    w = weight.dequantize(torch.float64)  # (N, K)
    out = x.double() @ w.T
    return out if bias is None else out + bias.double()


def _rel_err(out, ref):
    assert not torch.isnan(out).any(), "output has unwritten (NaN-poisoned) elements"
    return ((out.double() - ref).norm() / ref.norm()).item()


def _run(weight, m, dtype, bias, plan, device="cpu"):
    k, n = weight.in_features, weight.out_features
    x = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    out = torch.full((m, n), float("nan"), device=device, dtype=dtype)  # poison
    int4_matmul(x, weight, b, out, plan)
    return _rel_err(out, _reference(x, weight, b))


# (N, K, group, symmetric, M, plan): every kernel variant on odd shapes, ragged last groups
# (K=200/gs 64: 8 columns; K=96/gs 64: 32; K=204: words padded), split-K forced on and off.
CASES = [
    (48, 96, 32, True, 1, Plan("gemv", block_m=1, block_n=16, block_k=32, split_k=2)),
    (48, 200, 64, False, 1, Plan("gemv", block_m=1, block_n=32)),
    (48, 204, 32, False, 3, Plan("gemv", block_m=2, block_n=32)),  # K % 8 = 4: padded words
    (48, 204, 32, True, 1, Plan("gemv", block_m=1, block_n=32, split_k=2, prefetch=True)),
    (48, 96, 32, False, 2, Plan("gemv", block_m=2, block_n=16, split_k=1, prefetch=True)),
    (48, 160, 32, False, 3, Plan("gemv", block_m=2, block_n=16, split_k=3)),
    (48, 96, 64, True, 2, Plan("gemv", block_m=2, block_n=64, split_k=1)),
    # the plane layout: W = block_k / 8 words per plane, block_n rows per stored tile (N = 40:
    # a padded tile), chunks spanning two groups (g32, W 8), ragged K (576 / g128, 204)
    (40, 576, 128, False, 1, Plan("planes", block_m=1, block_n=32, block_k=128, prefetch=True)),
    (48, 204, 32, False, 3, Plan("planes", block_m=2, block_n=32, block_k=64, split_k=2)),
    (48, 256, 64, True, 2, Plan("planes", block_m=2, block_n=16, block_k=128, split_k=1)),
    (48, 160, 32, True, 1, Plan("planes", block_m=1, block_n=16, block_k=64, split_k=3)),
    (48, 200, 64, False, 3, Plan("dot", block_m=16, block_n=32, split_k=3)),
    (48, 160, 32, True, 17, Plan("dot", block_m=16, block_n=16, split_k=1)),
    (48, 204, 64, False, 3, Plan("dot", block_m=16, block_n=32, split_k=2)),
    (48, 96, 64, False, 17, Plan("dot", block_m=16, block_n=32, scale_in_tile=True)),
    (48, 200, 64, True, 5, Plan("dot", block_m=16, block_n=32, split_k=2, scale_in_tile=True)),
    # tensor cores on the canonical bytes: 8- and 16-row tiles, M past one tile (17), ragged K
    # (200 / g64: a half chunk; 204 / g32: 12 columns), asymmetric and symmetric, split-K
    (48, 200, 64, False, 1, Plan("tc", block_m=8, block_n=32, split_k=2)),
    (48, 204, 32, True, 3, Plan("tc", block_m=8, block_n=16, split_k=1)),
    (40, 256, 128, False, 17, Plan("tc", block_m=16, block_n=32, block_k=64, split_k=3)),
    (48, 160, 32, True, 5, Plan("tc", block_m=16, block_n=64)),
    (48, 200, 64, False, 17, Plan("dequant")),
    (48, 204, 32, True, 3, Plan("dequant")),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,k,gs,symmetric,m,plan", CASES, ids=[str(c[-1]) for c in CASES])
def test_int4_kernels_match_reference(n, k, gs, symmetric, m, plan, dtype):
    torch.manual_seed(n * k + m)
    weight = _weight(n, k, gs, symmetric, dtype)
    assert _run(weight, m, dtype, bias=m % 2 == 1, plan=plan) < TOL[dtype]


@pytest.mark.parametrize("symmetric", [False, True])
def test_dequant_path_in_row_pieces(monkeypatch, symmetric):
    """A layer wider than the scratch is dequantized and multiplied in pieces of 64 rows
    (150 = 64 + 64 + 22), each piece's scales and zeros a column block of the (G, N) layout."""
    from lowbit.engine.kernels import triton_common
    monkeypatch.setattr(triton_common, "SCRATCH_BYTES", 64 * 96 * 4)
    torch.manual_seed(11)
    weight = _weight(150, 96, 32, symmetric, torch.float32)
    assert _run(weight, 17, torch.float32, bias=True, plan=Plan("dequant")) < TOL[torch.float32]


def test_default_plan_is_logged_once_per_shape(caplog):
    """`lowbit -v` shows which kernel each quantized linear takes (tensor cores at M=1)."""
    torch.manual_seed(4)
    weight = _weight(40, 96, 32, True, torch.float16)
    with caplog.at_level("INFO", logger="lowbit.kernels"):
        for _ in range(2):
            int4_matmul(torch.randn(1, 96, dtype=torch.float16), weight, None,
                        torch.empty(1, 40, dtype=torch.float16))
    lines = [r.getMessage() for r in caplog.records if "40x96" in r.getMessage()]
    assert lines == ["dequant_matmul int4 40x96: tc(m8,n32,k32,splitauto8,w2,s3)"]


@pytest.mark.parametrize("k,gs,split", [(640, 256, 2), (200, 32, 3)], ids=["g256", "g32"])
def test_tc_programs_spanning_groups(k, gs, split):
    """A tc program looks up each chunk's group: g256 has two 128-column chunks a group, so with
    3 chunks a program the second program starts mid-group (and the last group is half full);
    g32 spans 3 groups a program in 32-column chunks."""
    from lowbit.engine.kernels.triton_gemv_tc import spanned_groups
    assert spanned_groups(3, 128, 256) == 4 and spanned_groups(3, 32, 32) == 4
    assert spanned_groups(8, 128, 128) == 8 and spanned_groups(4, 128, 0) == 0
    torch.manual_seed(k + gs)
    for symmetric in (False, True):
        weight = _weight(40, k, gs, symmetric, torch.float32)
        plan = Plan("tc", block_m=8, block_n=16, block_k=128, split_k=split)
        assert _run(weight, 3, torch.float32, bias=True, plan=plan) < TOL[torch.float32]


def test_split_k_counters_reset_between_calls():
    """The last program of a tile resets its counter; a stale one would skip the reduction."""
    torch.manual_seed(1)
    weight = _weight(48, 200, 32, False, torch.float32)
    plan = Plan("dot", block_m=16, block_n=16, split_k=3)
    errors = [_run(weight, 3, torch.float32, True, plan) for _ in range(3)]
    assert max(errors) < TOL[torch.float32]


def test_dispatch_keeps_leading_dims_and_bias():
    torch.manual_seed(2)
    weight = _weight(48, 96, 32, False, torch.float16)
    x = torch.randn(2, 3, 96, dtype=torch.float16)
    bias = torch.randn(48, dtype=torch.float16)
    with registry.use_backend("triton"):
        out = registry.dispatch("dequant_matmul", x, weight, bias)
    assert out.shape == (2, 3, 48) and out.dtype == torch.float16
    ref = _reference(x.reshape(6, 96), weight, bias).reshape(2, 3, 48)
    assert _rel_err(out, ref) < TOL[torch.float16]


def test_non_contiguous_activation_and_empty_batch():
    torch.manual_seed(3)
    weight = _weight(48, 96, 32, True, torch.float32)
    x = torch.randn(96, 5).t()  # (5, 96), stride 1 along rows: must be copied
    assert _rel_err(dequant_matmul(x, weight), _reference(x, weight, None)) < 1e-5
    assert dequant_matmul(torch.randn(0, 96), weight).shape == (0, 48)


def test_supports_names_the_problem():
    weight = _weight(48, 96, 32, True, torch.float32)
    assert supports(torch.randn(2, 96), weight) is None
    assert "in_features" in supports(torch.randn(2, 95), weight)
    assert "int64" in supports(torch.zeros(2, 96, dtype=torch.int64), weight)


def test_plane_layout_puts_each_plane_on_contiguous_columns():
    """Word j of chunk c, nibble i, holds u[n, c*8W + i*W + j]; tiles of block_n rows."""
    from lowbit.engine.kernels.triton_gemv_planes import plane_words
    u = torch.randint(0, 16, (6, 40), dtype=torch.uint8)
    words = plane_words(u, 4, 4, 4).view(2, 2, 4, 4).to(torch.int64) & 0xFFFFFFFF  # (T, C, BN, W)
    for n, k in [(0, 0), (1, 5), (3, 31), (5, 32), (4, 39)]:
        c, i, j = k // 32, k % 32 // 4, k % 4
        assert (words[n // 4, c, n % 4, j] >> (4 * i)) & 0xF == u[n, k]
    assert (words[1, :, 2:] == 0).all() and (words[:, 1, :, :] >> 8 * 4 == 0).all()


# (N, K, dtype): every Llama-3-8B shape in bf16, fp16 on one
GPU_SHAPES = [(4096, 4096, torch.bfloat16), (14336, 4096, torch.bfloat16),
              (4096, 14336, torch.bfloat16), (4096, 4096, torch.float16)]


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,dtype", GPU_SHAPES,
                         ids=[f"{n}x{k}-{str(d)[6:]}" for n, k, d in GPU_SHAPES])
@pytest.mark.parametrize("gs,symmetric", [(128, False), (64, True), (32, False)])
def test_int4_gpu_default_plans(n, k, gs, symmetric, dtype):
    torch.manual_seed(n + k + gs)
    weight = _weight(n, k, gs, symmetric, dtype, device="cuda")
    for m in (1, 2, 5, 16, 64, 300):
        assert _run(weight, m, dtype, bias=m == 5, plan=None, device="cuda") < TOL[dtype], m


@on_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("plan", [Plan("gemv", block_m=2, block_n=128),
                                  Plan("gemv", block_m=1, block_n=64, prefetch=True, waves=8),
                                  Plan("planes", block_m=1, block_n=256, block_k=64),
                                  Plan("planes", block_m=2, block_n=128, block_k=128),
                                  Plan("dot", block_m=16, block_n=128, split_k=4),
                                  Plan("dot", block_m=128, block_n=128, num_warps=8,
                                       num_stages=3, scale_in_tile=True),
                                  Plan("tc", block_m=8, block_n=128, num_stages=3),
                                  Plan("tc", block_m=16, block_n=64, split_k=4),
                                  Plan("dequant")], ids=str)
def test_int4_gpu_every_path(plan, dtype):
    torch.manual_seed(7)
    weight = _weight(4096, 4096, 128, False, dtype, device="cuda")
    m = {"gemv": plan.block_m, "planes": plan.block_m, "tc": plan.block_m - 3}.get(plan.path, 200)
    assert _run(weight, m, dtype, bias=True, plan=plan, device="cuda") < TOL[dtype]


@on_gpu
@pytest.mark.gpu
def test_int4_gpu_prefill_of_the_fused_gate_up():
    """Llama-3-8B's fused gate/up (28672 x 4096, 235 MB in bf16) at a prefill's M: wider than
    the dequant scratch, so it runs in two row pieces."""
    torch.manual_seed(8)
    weight = _weight(28672, 4096, 128, False, torch.bfloat16, device="cuda")
    assert _run(weight, 300, torch.bfloat16, bias=True, plan=None, device="cuda") < 1.5e-2
