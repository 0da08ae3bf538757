"""bitsandbytes formats: safetensors round trip, and outputs equal to bitsandbytes' own modules."""
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.engine.kernels.registry import BackendUnavailable
from lowbit.quant.bnb import (BNB_METHODS, Bnb4bitWeight, BnbInt8Weight, BnbUnavailable,
                              bnb_from_tensors, quantize_bnb)
from lowbit.quant.formats import FormatError

bnb = pytest.importorskip("bitsandbytes")
from lowbit.engine.bnb_linear import BnbLinear  # noqa: E402

FOUR_BIT = [("bnb-nf4", "nf4", True), ("bnb-fp4", "fp4", True), ("bnb-nf4-nodq", "nf4", False)]


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


def weight(n, k, dtype=torch.bfloat16, seed=0):
    return (0.02 * torch.randn(n, k, generator=torch.Generator().manual_seed(seed))).to(dtype)


def round_trip(fmt, method, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(fmt.tensors(), str(path))
    return bnb_from_tensors(method, load_file(str(path)), fmt.out_features, fmt.in_features,
                            fmt.dtype)


# An odd in_features sends bitsandbytes' CPU 4-bit code to a torch.compile'd path that compiles
# for ~7 s per shape; odd out_features and a ragged last block exercise the layout as well.
@pytest.mark.parametrize("method", BNB_METHODS)
@pytest.mark.parametrize("shape", [(96, 192), (77, 130), (1, 64)])
def test_tensors_round_trip_through_safetensors(tmp_path, method, shape):
    w = weight(*shape)
    fmt = quantize_bnb(w, method)
    back = round_trip(fmt, method, tmp_path)
    assert fmt.tensors().keys() == back.tensors().keys()
    for name, t in fmt.tensors().items():
        assert torch.equal(t, back.tensors()[name]), name
    assert torch.equal(fmt.dequantize(), back.dequantize())
    # 4 bits lose ~20 dB of signal at most on a Gaussian weight, 8 bits far less
    assert snr_db(w, back.dequantize()) > (15 if "int8" not in method else 35)


def test_quant_state_matches_the_one_bitsandbytes_made():
    w = weight(64, 320)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                 quant_type="nf4")
    rebuilt = Bnb4bitWeight.quantize(w, "nf4", double_quant=True).quant_state()
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state),
                       bnb.functional.dequantize_4bit(packed, rebuilt))
    assert rebuilt.nested and rebuilt.blocksize == 64 and rebuilt.state2.blocksize == 256


def _bnb_linear4bit(w, bias, quant_type, double_quant, device):
    module = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias is not None,
                               compute_dtype=w.dtype, compress_statistics=double_quant,
                               quant_type=quant_type)
    module.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64,
                                      compress_statistics=double_quant, quant_type=quant_type)
    if bias is not None:
        module.bias = torch.nn.Parameter(bias, requires_grad=False)
    return module.to(device).eval()


def _bnb_linear8bit(w, bias, device):
    module = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=bias is not None,
                                 has_fp16_weights=False, threshold=6.0)
    module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        module.bias = torch.nn.Parameter(bias, requires_grad=False)
    return module.to(device).eval()


def _check_against_bitsandbytes(tmp_path, method, shape, dtype, device):
    n, k = shape
    w = weight(n, k, dtype).to(device)
    bias = (0.1 * torch.randn(n)).to(dtype).to(device)
    fmt = round_trip(quantize_bnb(w, method).to("cpu"), method, tmp_path).to(device)
    ours = BnbLinear(fmt, bias)
    if method == "bnb-int8":
        theirs = _bnb_linear8bit(w.cpu(), bias.cpu(), device)
    else:
        quant_type = "nf4" if "nf4" in method else "fp4"
        theirs = _bnb_linear4bit(w.cpu(), bias.cpu(), quant_type, not method.endswith("-nodq"),
                                 device)
    for rows in (1, 5, 33):  # decode GEMV, small and larger GEMM
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        x[:, 3] = 8.0  # an outlier column: LLM.int8 keeps it in 16-bit
        x = x.to(device)
        with torch.inference_mode():
            y_ours, y_theirs = ours(x), theirs(x)
        assert y_ours.dtype == dtype and y_ours.shape == (rows, n)
        assert torch.equal(y_ours, y_theirs), f"{method} rows={rows}"
        ref = x.double() @ fmt.dequantize(torch.float64).T + bias.double()
        assert snr_db(ref, y_ours) > 25  # the kernel computes what the stored weight says


CPU_4BIT_SHAPES = [(96, 192), (32, 320)]  # bitsandbytes' AVX512-BF16 kernel: K % 64, N % 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-fp4", "bnb-nf4-nodq"])
@pytest.mark.parametrize("shape", CPU_4BIT_SHAPES)
def test_4bit_matches_bitsandbytes_linear4bit_on_cpu(tmp_path, method, shape, dtype):
    _check_against_bitsandbytes(tmp_path, method, shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(77, 131), (64, 256)])
def test_int8_matches_bitsandbytes_linear8bitlt_on_cpu(tmp_path, shape, dtype):
    _check_against_bitsandbytes(tmp_path, "bnb-int8", shape, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", BNB_METHODS)
@pytest.mark.parametrize("shape", [(96, 192), (77, 130)])
def test_matches_bitsandbytes_on_cuda(tmp_path, method, shape):
    _check_against_bitsandbytes(tmp_path, method, shape, torch.bfloat16, "cuda")


def test_cpu_4bit_shape_bitsandbytes_cannot_run_is_refused_with_the_reason():
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU takes bitsandbytes' generic 4-bit path, which runs any shape")
    layer = BnbLinear(quantize_bnb(weight(40, 128), "bnb-nf4"))
    with pytest.raises(BackendUnavailable, match=r"out_features % 32 == 0"):
        layer(torch.randn(1, 128, dtype=torch.bfloat16))


def test_bad_tensors_are_named():
    fmt = quantize_bnb(weight(32, 64), "bnb-nf4")
    tensors = fmt.tensors()
    with pytest.raises(FormatError, match="absmax: dtype float32, expected uint8"):
        bnb_from_tensors("bnb-nf4", {**tensors, "absmax": tensors["absmax"].float()}, 32, 64,
                         torch.bfloat16)
    with pytest.raises(FormatError, match="missing"):
        bnb_from_tensors("bnb-nf4-nodq", tensors, 32, 64, torch.bfloat16)
    with pytest.raises(FormatError, match="qweight: shape"):
        bnb_from_tensors("bnb-int8", BnbInt8Weight.quantize(weight(32, 64)).tensors(), 32, 65,
                         torch.bfloat16)


def test_stored_bytes_are_what_the_profile_counts():
    from lowbit.engine.profile import linear_format_bytes
    for method, kind, dq in [("bnb-nf4", "bnb-nf4", True), ("bnb-fp4-nodq", "bnb-fp4", False),
                             ("bnb-int8", "bnb-int8", True)]:
        layer = BnbLinear(quantize_bnb(weight(96, 192), method))
        assert layer.nbytes == linear_format_bytes(kind, 96, 192, 2, double_quant=dq), method


def test_missing_bitsandbytes_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(BnbUnavailable, match="pip install bitsandbytes"):
        quantize_bnb(weight(32, 64), "bnb-nf4")


def test_config_and_bnb_module_name_the_same_methods():
    from lowbit.quant.config import BNB_METHODS as CONFIG_METHODS
    assert set(CONFIG_METHODS) == set(BNB_METHODS)


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8"])
def test_checkpoint_round_trip_runs_like_quantizing_on_the_fly(tmp_path, method):
    from helpers import write_tiny_llama

    from lowbit.engine.bnb_linear import BnbLinear
    from lowbit.engine.kv_cache import create_cache
    from lowbit.engine.load import load_model
    from lowbit.quant.bnb import bnb_quant_config
    from lowbit.quant.checkpoint import read_checkpoint
    from lowbit.quant.convert import convert

    src = write_tiny_llama(tmp_path / "tiny")  # K in {64, 128}, N in {32, 64, 128, 320}
    cfg = bnb_quant_config(method)
    convert(src, tmp_path / "ckpt", cfg, progress=False)
    ckpt = read_checkpoint(tmp_path / "ckpt")
    assert ckpt.quant.name == method
    stored = ckpt.linear_format("model.layers.0.mlp.up_proj")
    assert isinstance(stored, Bnb4bitWeight if method == "bnb-nf4" else BnbInt8Weight)
    ckpt.close()

    from_ckpt = load_model(tmp_path / "ckpt", device="cpu", dtype="bf16")
    on_the_fly = load_model(src, device="cpu", dtype="bf16", quant=cfg)
    assert isinstance(from_ckpt.model.model.layers[0].mlp.up_proj, BnbLinear)
    tokens = torch.tensor([[5, 17, 42, 99, 7]])
    logits = []
    for loaded in (from_ckpt, on_the_fly):
        cache = create_cache(16, loaded.config, 1, 8, torch.bfloat16, "cpu")
        with torch.inference_mode():
            logits.append(loaded.model(tokens, torch.arange(5), cache, kv_len=5))
    assert torch.equal(logits[0], logits[1])


def test_llm_int8_declares_it_cannot_be_graph_captured():
    int8 = BnbLinear(quantize_bnb(weight(32, 64), "bnb-int8"))
    nf4 = BnbLinear(quantize_bnb(weight(32, 64), "bnb-nf4"))
    assert "host sync" in int8.cuda_graph_unsafe and nf4.cuda_graph_unsafe is None
