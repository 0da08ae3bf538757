import pytest
import torch

from lowbit.quant.primitives import (QuantizationError, dequantize_affine, num_groups, pack_int4,
                                     quantize_affine, symmetric_range, unpack_int4)

SHAPES = [(7, 576, 128), (5, 200, 64), (3, 96, 32), (4, 130, 16)]  # (N, K, gs); most ragged


def _unclamped_code(w, scale, zero, gs):
    """round(w / s) + z per element, before clamping: inside the code range means not clipped."""
    k = w.shape[1]
    s = scale.float().repeat_interleave(gs, 1)[:, :k]
    code = torch.round(w.float() / s)
    if zero is not None:
        code = code + zero.float().repeat_interleave(gs, 1)[:, :k]
    return code, s


@pytest.mark.parametrize("n,k,gs", SHAPES)
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_within_half_step(n, k, gs, bits, symmetric, scale_dtype):
    w = torch.randn(n, k) * 0.05
    q, scale, zero = quantize_affine(w, bits, gs, symmetric, scale_dtype)
    assert q.shape == (n, k) and scale.shape == (n, num_groups(k, gs)) and scale.dtype == scale_dtype
    assert (zero is None) == symmetric
    lo, hi = symmetric_range(bits) if symmetric else (0, 2 ** bits - 1)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    w_hat = dequantize_affine(q, scale, zero, gs, torch.float32)
    code, s = _unclamped_code(w, scale, zero, gs)
    inside = (code >= lo) & (code <= hi)
    assert inside.float().mean() > 0.9
    err = (w - w_hat).abs()
    assert (err[inside] <= s[inside] / 2 * (1 + 1e-5) + 1e-9).all()


def test_scale_rounded_before_codes():
    """Codes are computed against the stored (rounded) scale, so requantizing w_hat is exact."""
    w = torch.randn(16, 256)
    q, scale, zero = quantize_affine(w, 4, 64, False, torch.bfloat16)
    w_hat = dequantize_affine(q, scale, zero, 64, torch.float32)
    code, _ = _unclamped_code(w_hat, scale, zero, 64)
    assert torch.equal(code.clamp(0, 15).to(torch.uint8), q)


def test_asymmetric_zero_is_integer_in_range_and_all_positive_group():
    w = torch.rand(4, 64) + 1.0  # all positive: range widened to include 0, so z = 0
    q, scale, zero = quantize_affine(w, 4, 32, False, torch.float32)
    assert zero.dtype == torch.uint8 and (zero == 0).all()
    w_hat = dequantize_affine(q, scale, zero, 32, torch.float32)
    assert ((w - w_hat).abs() <= scale.float().repeat_interleave(32, 1) / 2 + 1e-6).all()


def test_zero_group_roundtrips_exactly():
    w = torch.zeros(3, 64)
    w[0, :32] = torch.randn(32)
    for sym in (True, False):
        q, scale, zero = quantize_affine(w, 4, 32, sym, torch.float16)
        assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
        assert torch.equal(dequantize_affine(q, scale, zero, 32, torch.float32)[1:], w[1:])


def test_per_channel_is_group_size_k():
    w = torch.randn(6, 100)
    q, scale, _ = quantize_affine(w, 8, 100, True, torch.float32)
    assert scale.shape == (6, 1)
    torch.testing.assert_close(scale[:, 0], w.abs().amax(1) / 127)


@pytest.mark.parametrize("shape", [(1, 2), (5, 74), (3, 4, 10)])
def test_pack_unpack_bit_exact(shape):
    u = torch.randint(0, 16, shape, dtype=torch.uint8)
    b = pack_int4(u)
    assert b.dtype == torch.uint8 and b.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(b), u)
    # even index in the low nibble
    assert torch.equal(b & 0x0F, u[..., 0::2]) and torch.equal(b >> 4, u[..., 1::2])


def test_pack_layout_literal():
    u = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(u).tolist() == [[0x21, 0x0F]]


def test_bad_inputs():
    with pytest.raises(QuantizationError, match="even"):
        pack_int4(torch.zeros(2, 5, dtype=torch.uint8))
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_affine(torch.randn(4), 4, 32, True, torch.float32)
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_affine(torch.full((2, 32), float("nan")), 4, 32, True, torch.float32)
    with pytest.raises(QuantizationError, match="8-bit codes"):
        quantize_affine(torch.randn(2, 32), 3, 32, True, torch.float32)
