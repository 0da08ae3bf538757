"""The model on the fused elementwise ops (rms_norm, add_rms_norm, rotary_update, silu_mul): the Triton
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
from helpers import rel_err, triton_gpu_only  # noqa: E402

FUSED_OPS = ("rms_norm", "add_rms_norm", "rotary_update", "silu_mul")


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



@pytest.mark.gpu
@triton_gpu_only()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama3_layers_triton_and_graph(dtype):
    """Two Llama-3-8B-shaped layers (vocab cut to 4096) on CUDA. Against the fp32 model, the
    fused ops are as accurate as the 16-bit reference (measured on CPU, bf16 reference vs fp32:
    1.8e-2 relative, fp16 2.1e-3); a CUDA-graph replay of a decode step equals the eager step."""
    import copy
    import dataclasses

    from lowbit.engine.cuda_graph import GraphedDecodeStep
    from lowbit.engine.model_configs import named_config
    from lowbit.engine.rope import inverse_frequencies
    cfg = dataclasses.replace(named_config("llama-3-8b")[1], num_layers=2, vocab_size=4096)
    device = torch.device("cuda")
    exact = random_model(cfg, device, torch.float32, seed=3)
    model = copy.deepcopy(exact).to(dtype)
    model.rotary.inv_freq = inverse_frequencies(cfg).to(device)  # fp32, as loading keeps it
    ids = torch.randint(0, cfg.vocab_size, (1, 33), device=device)

    def run(m, backend, dt, kv_len=33):
        cache = create_cache(16, cfg, 1, 64, dt, device)
        with torch.no_grad(), registry.use_backend(backend):
            prefill = m(ids[:, :-1], torch.arange(32, device=device), cache, kv_len=32)
            step = m(ids[:, -1:], torch.tensor([32], device=device), cache, kv_len=kv_len)
        return torch.cat((prefill, step), dim=1), cache

    want = run(exact, "reference", torch.float32)[0]
    reference_err = rel_err(run(model, "reference", dtype)[0], want)
    fused, _ = run(model, "triton", dtype, kv_len=None)  # the graph's form of the decode step
    assert rel_err(fused, want) < 1.25 * reference_err

    cache = create_cache(16, cfg, 1, 64, dtype, device)
    with torch.no_grad():
        graphed = GraphedDecodeStep(model, cache, device)  # before the prefill: it writes pos 0
        model(ids[:, :-1], torch.arange(32, device=device), cache, kv_len=32)
        replayed = graphed(ids[:, -1], 32)  # (1, V)
    # same kernels on the same inputs; a tolerance, not equality, in case cuBLAS picks another
    # algorithm under capture
    assert rel_err(replayed, fused[:, -1]) < 1e-3
