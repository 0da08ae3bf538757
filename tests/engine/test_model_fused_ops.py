"""The model on the fused elementwise ops (rms_norm, add_rms_norm, rotary, silu_mul): the Triton
backend's logits match the reference's, and carrying (residual, delta) across layers changes
nothing on the reference path."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed")

from lowbit.engine.kernels import registry  # noqa: E402
from lowbit.engine.kv_cache import create_cache  # noqa: E402
from lowbit.engine.random_model import random_model  # noqa: E402
from lowbit.quant.architecture import ModelConfig  # noqa: E402

FUSED_OPS = ("rms_norm", "add_rms_norm", "rotary", "silu_mul")


def tiny_config(layers=2):
    # head_dim 32: the Triton kv_attention needs a power of two in [32, 256]; hidden 128 over
    # 4 heads and 2 KV heads (GQA), intermediate 200 (a partial silu_mul block)
    return ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 96, "hidden_size": 128, "intermediate_size": 200,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 256})


def prefill_then_decode(model, cfg, ids, backend):
    """Logits of a prefill of all but the last token, then one decode step: (B, T, V)."""
    t = ids.shape[1]
    cache = create_cache(16, cfg, ids.shape[0], t + 3, torch.float32, "cpu")
    with torch.no_grad(), registry.use_backend(backend):
        prefill = model(ids[:, :-1], torch.arange(t - 1), cache, kv_len=t - 1)
        step = model(ids[:, -1:], torch.tensor([t - 1]), cache, kv_len=t)
    return torch.cat((prefill, step), dim=1)


def test_triton_logits_match_reference():
    cfg = tiny_config()
    model = random_model(cfg, torch.device("cpu"), torch.float32, seed=1)  # gate_up fused
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    want = prefill_then_decode(model, cfg, ids, "reference")
    registry.reset_chosen()
    got = prefill_then_decode(model, cfg, ids, "triton")
    for op in FUSED_OPS:
        assert set(registry.chosen()[op]["cpu/gemv"]) == {"triton"}, op
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, err  # fp32: summation order and fma only


def test_carried_residual_equals_layer_by_layer():
    """hidden_states fuses each residual add into the next norm; on the reference path that is
    bit-for-bit the unfused x = layer(x) chain and final norm."""
    cfg = tiny_config(layers=3)
    model = random_model(cfg, torch.device("cpu"), torch.float32, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6)
    with torch.no_grad():
        fused = model.hidden_states(ids, positions, create_cache(16, cfg, 1, 6, torch.float32,
                                                                 "cpu"), kv_len=6)
        cache = create_cache(16, cfg, 1, 6, torch.float32, "cpu")
        x = model.model.embed_tokens(ids)
        cos, sin = model.rotary(positions, x.dtype)
        for layer in model.model.layers:
            x = layer(x, cos, sin, positions, cache, 6)
        assert torch.equal(fused, model.model.norm(x))
