import pytest
import torch

from lowbit.quant.formats import FormatError, Int4Weight, Int8Weight


def _snr_db(ref, approx):
    ref, approx = ref.float(), approx.float()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum())).item()


@pytest.mark.parametrize("n,k,gs", [(9, 576, 128), (5, 200, 64), (3, 64, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_layout_and_roundtrip(n, k, gs, symmetric, dtype):
    w = (torch.randn(n, k) * 0.02).to(dtype)
    f = Int4Weight.quantize(w, gs, symmetric=symmetric)
    g = -(-k // gs)
    assert f.qweight.shape == (n, k // 2) and f.qweight.dtype == torch.uint8
    assert f.scales.shape == (n, g) and f.scales.dtype == dtype
    assert (f.zeros is None) == symmetric
    assert set(f.tensors()) == ({"qweight", "scales"} if symmetric else {"qweight", "scales", "zeros"})
    assert (f.in_features, f.out_features, f.group_size, f.symmetric) == (k, n, gs, symmetric)
    w_hat = f.dequantize()
    assert w_hat.shape == (n, k) and w_hat.dtype == dtype
    assert f.dequantize(torch.float32).dtype == torch.float32
    # at most half a step from w except where clipped: the +absmax of a symmetric group, or a
    # group end when the 16-bit scale rounded down (the exact bound is in test_primitives)
    s = f.scales.float().repeat_interleave(gs, 1)[:, :k]
    err = (w.float() - f.dequantize(torch.float32)).abs()
    frac_within = (err <= s / 2 * 1.01 + 1e-6).float().mean()
    assert frac_within >= 0.95
    assert _snr_db(w, w_hat) > 15


def test_int4_dequant_formula_literal():
    """w = (u - z) * s with the even input index in the low nibble."""
    qweight = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # u = [1, 2, 0, 15]
    scales = torch.tensor([[0.5]], dtype=torch.float32)  # K = 4 < gs: one group
    f = Int4Weight.from_tensors({"qweight": qweight, "scales": scales,
                                 "zeros": torch.tensor([[3]], dtype=torch.uint8)}, 16, 4, False)
    assert f.dequantize().tolist() == [[-1.0, -0.5, -1.5, 6.0]]
    f = Int4Weight.from_tensors({"qweight": qweight, "scales": scales}, 16, 4, True)
    assert f.dequantize().tolist() == [[-3.5, -3.0, -4.0, 3.5]]


def test_int4_ragged_last_group():
    w = torch.randn(4, 576)
    w[:, 512:] *= 100  # the ragged last group (64 columns) gets its own, larger scale
    f = Int4Weight.quantize(w, 128, symmetric=False)
    assert f.scales.shape == (4, 5)
    assert (f.scales[:, 4] > 20 * f.scales[:, :4].amax(1)).all()
    assert _snr_db(w[:, :512], f.dequantize()[:, :512]) > 15


@pytest.mark.parametrize("gs", [None, 64])
@pytest.mark.parametrize("k", [576, 200])
def test_int8_layout_and_roundtrip(gs, k):
    w = torch.randn(11, k, dtype=torch.bfloat16)
    f = Int8Weight.quantize(w, gs)
    g = 1 if gs is None else -(-k // gs)
    assert f.qweight.dtype == torch.int8 and f.qweight.shape == (11, k)
    assert f.scales.shape == (11, g) and f.scales.dtype == torch.bfloat16
    assert int(f.qweight.min()) >= -127
    assert set(f.tensors()) == {"qweight", "scales"}
    s = f.scales.float().repeat_interleave(f.block_size, 1)[:, :k]
    assert ((w.float() - f.dequantize(torch.float32)).abs() <= s / 2 * 1.01).all()
    assert _snr_db(w, f.dequantize()) > 35


def test_int8_grouped_beats_per_channel_on_outliers():
    w = torch.randn(64, 512)
    w[torch.arange(64), torch.randint(0, 512, (64,))] = 40.0  # one outlier per row
    per_channel = Int8Weight.quantize(w, None).dequantize()
    grouped = Int8Weight.quantize(w, 64).dequantize()
    mse_pc = (w - per_channel).pow(2).mean()
    mse_g = (w - grouped).pow(2).mean()
    assert mse_g < 0.5 * mse_pc


@pytest.mark.parametrize("cls,kw", [(Int4Weight, {"symmetric": False}), (Int4Weight, {"symmetric": True}),
                                    (Int8Weight, {})])
def test_from_tensors_roundtrip_and_nbytes(cls, kw):
    w = torch.randn(6, 200, dtype=torch.float16)
    f = cls.quantize(w, 64, **kw)
    g = cls.from_tensors(dict(f.tensors()), 64, 200, f.symmetric)
    assert torch.equal(g.dequantize(), f.dequantize())
    assert f.nbytes == sum(t.numel() * t.element_size() for t in f.tensors().values())
    assert f.bits_per_weight == pytest.approx(8 * f.nbytes / (6 * 200))
    assert torch.equal(f.to("cpu").dequantize(), f.dequantize())


def test_bits_per_weight_values():
    w = torch.randn(128, 1024, dtype=torch.bfloat16)
    assert Int4Weight.quantize(w, 128, symmetric=True).bits_per_weight == pytest.approx(4.125)
    assert Int4Weight.quantize(w, 128, symmetric=False).bits_per_weight == pytest.approx(4.1875)
    assert Int8Weight.quantize(w).bits_per_weight == pytest.approx(8 + 16 / 1024)


def test_bad_inputs_raise_format_error():
    w = torch.randn(4, 65)
    with pytest.raises(FormatError, match="even number of input features"):
        Int4Weight.quantize(w, 32)
    with pytest.raises(FormatError, match="power of two"):
        Int4Weight.quantize(torch.randn(4, 64), 48)
    with pytest.raises(FormatError, match="power of two"):
        Int8Weight.quantize(torch.randn(4, 64), 100)
    with pytest.raises(FormatError, match="symmetric only"):
        Int8Weight.quantize(torch.randn(4, 64), symmetric=False)
    with pytest.raises(FormatError, match="fp16, bf16 or fp32"):
        Int4Weight.quantize(torch.randn(4, 64, dtype=torch.float64), 32)

    good = Int4Weight.quantize(torch.randn(4, 64), 32, symmetric=False).tensors()
    cases = [
        ({**good, "qweight": good["qweight"].to(torch.int8)}, "qweight: dtype int8"),
        ({**good, "qweight": good["qweight"][:, :-1]}, r"qweight: shape \(4, 31\)"),
        ({**good, "scales": good["scales"][:, :1]}, r"scales: shape \(4, 1\), expected \(4, 2\)"),
        ({**good, "scales": good["scales"].to(torch.int32)}, "scales: dtype int32"),
        ({k: v for k, v in good.items() if k != "zeros"}, "missing tensor.*zeros"),
        ({**good, "zeros": torch.full((4, 2), 16, dtype=torch.uint8)}, "outside the int4 range"),
        ({**good, "bias": torch.zeros(4)}, "unexpected tensor.*bias"),
    ]
    for tensors, msg in cases:
        with pytest.raises(FormatError, match=msg):
            Int4Weight.from_tensors(tensors, 32, 64, symmetric=False)
    with pytest.raises(FormatError, match="unexpected tensor.*zeros"):
        Int4Weight.from_tensors(good, 32, 64, symmetric=True)
    with pytest.raises(FormatError, match="even number"):
        Int4Weight.from_tensors(good, 32, 63, symmetric=False)
    i8 = Int8Weight.quantize(torch.randn(4, 64)).tensors()
    with pytest.raises(FormatError, match=r"scales: shape \(4, 1\), expected \(4, 2\)"):
        Int8Weight.from_tensors(i8, 32, 64, True)
    with pytest.raises(FormatError, match=r"qweight: shape \(4, 64\), expected \(4, 65\)"):
        Int8Weight.from_tensors(i8, None, 65, True)
