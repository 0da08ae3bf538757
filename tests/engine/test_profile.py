"""Phase FLOP and byte counts against a hand count; the roofline verdict."""
import pytest
import torch

from lowbit.engine.device_limits import DeviceLimits
from lowbit.engine.model_configs import named_config
from lowbit.engine.profile import (ProfileError, analytic_layout, format_phase_report,
                                   linear_format_bytes, model_layout, phase_costs, phase_report)
from lowbit.quant.architecture import ModelConfig

# hidden 8, intermediate 16, 1 layer, 2 query heads and 1 KV head of dim 4, vocab 32, untied
TINY = ModelConfig.from_hf({
    "model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
    "tie_word_embeddings": False})
KV_BYTES_PER_TOKEN = 2 * 1 * 1 * 4 * 2  # K and V × 1 layer × 1 KV head × dim 4 × 2 bytes = 16


def fixed_device(ridge: float) -> DeviceLimits:
    return DeviceLimits("test device", "test", copy_GBps=100.0, matmul_TFLOPs=ridge * 0.1,
                        matmul_dtype="bfloat16", measured="2025-01-01T00:00:00+00:00")


def test_prefill_and_decode_match_a_hand_count():
    layout = analytic_layout(TINY, "16", dtype_bytes=2)
    prefill, decode = phase_costs(TINY, layout, prompt_tokens=4, new_tokens=3,
                                  kv_bytes_per_token=KV_BYTES_PER_TOKEN, act_bytes=2)
    # Multiply-adds of the layer's linears: q 8·8 + k 4·8 + v 4·8 + o 8·8 + gate 16·8 + up 16·8
    # + down 8·16 = 64 + 32 + 32 + 64 + 128 + 128 + 128 = 576; lm_head 32·8 = 256.
    # Prefill of 4 tokens: linears 2·4·576 = 4608; lm_head on the last row only 2·256 = 512;
    # attention: causal keys 1 + 2 + 3 + 4 = 10, 4 FLOPs × (2 heads · dim 4) per key = 320.
    assert prefill.flops == 4608 + 512 + 320
    # Weights read once at 2 bytes: (576 + 256) · 2 = 1664; norms 3 × 8 × 2 = 48; 4 embedding
    # rows 4 × 8 × 2 = 64.
    assert prefill.weight_bytes == 1664 + 48 + 64
    assert prefill.kv_write_bytes == 4 * 16 and prefill.kv_read_bytes == 4 * 16
    # Activations, elements: embedding out 4·8 = 32; linear in + out per token: q 16, k 12, v 12,
    # o 16, gate 24, up 24, down 24 = 128, × 4 tokens = 512; attention Q in + out 2·4·8 = 64;
    # lm_head in + logits 8 + 32 = 40. Total 648 elements × 2 bytes.
    assert prefill.activation_bytes == 648 * 2
    assert prefill.bytes == 1776 + 128 + 1296
    assert prefill.intensity == pytest.approx(5440 / 3200)
    # Decode: 2 steps (the first of the 3 new tokens comes from prefill), at positions 4 and 5,
    # seeing 5 and 6 keys. FLOPs per step: 2·576 + 2·256 + 32·keys.
    assert decode.tokens == 2
    assert decode.flops == (1152 + 512 + 32 * 5) + (1152 + 512 + 32 * 6)
    # Bytes per step: weights 1664 + 48 + one embedding row 16; KV write 16, read keys · 16;
    # activations (8 + 128 + 16 + 40) · 2 = 384.
    assert decode.weight_bytes == 2 * 1728
    assert decode.kv_write_bytes == 2 * 16
    assert decode.kv_read_bytes == (5 + 6) * 16
    assert decode.activation_bytes == 2 * 384


def test_quantized_formats_count_their_scales_and_zeros():
    # int4 8×32, groups of 16: 8·32/2 packed + 8·2 scales × 2 bytes + 8·2 uint8 zeros
    assert linear_format_bytes("int4", 8, 32, 2, group_size=16) == 128 + 32 + 16
    assert linear_format_bytes("int4", 8, 32, 2, group_size=16, symmetric=True) == 128 + 32
    # int8 per channel: 8·32 + 8 scales × 2 bytes
    assert linear_format_bytes("int8", 8, 32, 2) == 256 + 16
    # nf4 64×64 double-quantized: 2048 packed + 64 uint8 block absmaxes + 1 fp32 nested absmax
    # + nested code 256·4 + its fp32 offset + the 16-entry fp32 code
    assert linear_format_bytes("bnb-nf4", 64, 64, 2) == 2048 + 64 + 4 + 1028 + 64
    assert linear_format_bytes("bnb-fp4", 64, 64, 2, double_quant=False) == 2048 + 64 * 4 + 64
    # LLM.int8: int8 weights + one fp32 scale per row
    assert linear_format_bytes("bnb-int8", 8, 32, 2) == 256 + 32
    with pytest.raises(ProfileError, match="unknown weight format"):
        linear_format_bytes("int3", 8, 32, 2)


def test_tied_lm_head_reads_the_embedding_unless_quantized_on_purpose():
    _, cfg = named_config("smollm2-135m")
    v, h = cfg.vocab_size, cfg.hidden_size
    tied = analytic_layout(cfg, "int4", dtype_bytes=2, group_size=64)
    assert tied.linear_bytes["lm_head"] == v * h * 2
    copy = analytic_layout(cfg, "int4", dtype_bytes=2, group_size=64, quantize_tied_lm_head=True)
    assert copy.linear_bytes["lm_head"] == linear_format_bytes("int4", v, h, 2, group_size=64)


def test_model_layout_reads_the_stored_tensors():
    from lowbit.engine.model import Transformer
    model = Transformer(TINY).to(torch.float16)
    measured = model_layout(model, "16")
    counted = analytic_layout(TINY, "16", dtype_bytes=2)
    assert measured.linear_bytes == counted.linear_bytes
    assert measured.norm_bytes == counted.norm_bytes
    assert measured.embedding_row_bytes == counted.embedding_row_bytes


def test_verdict_flips_from_memory_to_compute_bound_as_the_prompt_grows():
    _, cfg = named_config("llama-3-8b")
    layout = analytic_layout(cfg, "16", dtype_bytes=2)
    limits = fixed_device(ridge=200.0)
    kv = 2 * cfg.num_layers * cfg.kv_size * 2
    verdicts = []
    for p in (1, 4, 16, 64, 256, 1024):
        r = phase_report(cfg, layout, prompt_tokens=p, new_tokens=1, prefill_s=1.0, decode_s=0.0,
                         kv_bytes_per_token=kv, kv_bits=16, act_bytes=2, limits=limits)
        verdicts.append(r["prefill"]["verdict"])
        assert r["decode"]["verdict"] is None  # one new token: no decode step ran
    assert verdicts[0] == "memory-bound" and verdicts[-1] == "compute-bound"
    flip = verdicts.index("compute-bound")
    assert all(v == "compute-bound" for v in verdicts[flip:])


def test_report_achieved_rates_and_shares():
    layout = analytic_layout(TINY, "16", dtype_bytes=2)
    limits = fixed_device(ridge=10.0)  # 1 TFLOP/s, 100 GB/s
    r = phase_report(TINY, layout, prompt_tokens=4, new_tokens=3, prefill_s=1e-6, decode_s=3e-6,
                     kv_bytes_per_token=KV_BYTES_PER_TOKEN, kv_bits=16, act_bytes=2,
                     limits=limits)
    pre, dec = r["prefill"], r["decode"]
    assert pre["share"] == pytest.approx(0.25) and dec["share"] == pytest.approx(0.75)
    assert pre["flops_per_s"] == pytest.approx(5440 / 1e-6)
    assert pre["frac_copy"] == pytest.approx(3200 / 1e-6 / 100e9)
    assert pre["verdict"] == dec["verdict"] == "memory-bound"
    assert dec["bytes_per_token"] == pytest.approx((2208 + 2224) / 2)
    text = format_phase_report(r)
    assert "prefill" in text and "decode" in text and "memory-bound" in text
    assert "ridge 10.0 FLOP/byte" in text


@pytest.mark.parametrize("weights,group,symmetric", [("16", None, False), ("int8", None, True),
                                                     ("int4", 32, False), ("int4", 16, True)])
def test_counted_layout_equals_the_bytes_a_quantized_model_stores(weights, group, symmetric):
    from lowbit.engine.random_model import random_model
    from lowbit.quant.config import QuantConfig

    # tied, with a ragged last group (48 = 32 + 16) and qkv biases
    cfg = ModelConfig.from_hf({
        "model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": True})
    for quantize_head in (False, True):
        quant = None if weights == "16" else QuantConfig(
            weight_bits=int(weights[3:]), group_size=group, symmetric=symmetric,
            quantize_tied_lm_head=quantize_head)
        model = random_model(cfg, torch.device("cpu"), torch.float16, quant)
        counted = analytic_layout(cfg, weights, 2, group_size=group, symmetric=symmetric,
                                  quantize_tied_lm_head=quantize_head)
        assert model_layout(model, weights).linear_bytes == counted.linear_bytes


def test_phase_table_has_one_line_per_variant():
    from lowbit.engine.profile import format_phase_table
    layout = analytic_layout(TINY, "16", dtype_bytes=2)
    limits = fixed_device(ridge=10.0)
    phases = phase_report(TINY, layout, prompt_tokens=4, new_tokens=3, prefill_s=1e-6,
                          decode_s=3e-6, kv_bytes_per_token=KV_BYTES_PER_TOKEN, kv_bits=16,
                          act_bytes=2, limits=limits)
    text = format_phase_table([{"name": "16 kv16", "phases": phases},
                               {"name": "no limits", "phases": None}])
    lines = text.splitlines()
    assert len(lines) == 3 and lines[1].startswith("variant") and lines[2].startswith("16 kv16")
    assert "memory-bound" in lines[2] and lines[2].endswith("75%")
    assert format_phase_table([{"name": "x", "phases": None}]) == ""
