"""The engine's logits equal transformers' on the same weights; cached decode equals a full pass."""
import pytest
import torch
from helpers import write_tiny_llama

from lowbit.engine.kv_cache import create_cache
from lowbit.engine.load import load_model

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "llama-gqa-untied": {},
    "llama-tied": {"tie": True},
    "llama3-rope-scaling": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 32}},
    "llama-attention-bias": {"qkv_bias": True},
    "qwen2-qkv-bias": {"model_type": "qwen2", "tie": True},
    "mistral-mha": {"model_type": "mistral", "kv_heads": 4},
}


def full_logits(loaded, ids):
    t = ids.shape[1]
    cache = create_cache(16, loaded.config, ids.shape[0], t, loaded.dtype, loaded.device)
    return loaded.model(ids, torch.arange(t), cache, kv_len=t)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    path = write_tiny_llama(tmp_path / variant, **VARIANTS[variant])
    ours = load_model(path, device="cpu", dtype="fp32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = full_logits(ours, ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_positions_past_original_context_use_llama3_scaling(tmp_path):
    """Positions beyond original_max_position_embeddings (32 here) exercise the scaled band."""
    path = write_tiny_llama(tmp_path / "m", **VARIANTS["llama3-rope-scaling"])
    ours = load_model(path, device="cpu", dtype="fp32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (full_logits(ours, ids) - theirs(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "qwen2-qkv-bias"])
def test_token_by_token_decode_equals_full_pass(tmp_path, variant):
    path = write_tiny_llama(tmp_path / variant, **VARIANTS[variant])
    loaded = load_model(path, device="cpu", dtype="fp32")
    ids = torch.randint(0, loaded.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = full_logits(loaded, ids)
        cache = create_cache(16, loaded.config, 1, 40, torch.float32, "cpu")
        prefix = 13  # a prefill of 13 tokens, then 27 single-token decode steps
        steps = [loaded.model(ids[:, :prefix], torch.arange(prefix), cache, kv_len=prefix)]
        for p in range(prefix, 40):
            steps.append(loaded.model(ids[:, p:p + 1], torch.tensor([p]), cache, kv_len=p + 1))
        got = torch.cat(steps, dim=1)
    assert (got - expected).abs().max().item() <= 1e-4


def test_static_full_cache_mask_equals_sliced(tmp_path):
    """kv_len=None (the CUDA-graph form: whole cache, masked) gives the same logits as slicing."""
    path = write_tiny_llama(tmp_path / "m")
    loaded = load_model(path, device="cpu", dtype="fp32")
    ids = torch.randint(0, loaded.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = create_cache(16, loaded.config, 1, 64, torch.float32, "cpu")
        b = create_cache(16, loaded.config, 1, 64, torch.float32, "cpu")
        sliced = loaded.model(ids, torch.arange(20), a, kv_len=20)
        static = loaded.model(ids, torch.arange(20), b, kv_len=None)
    assert (sliced - static).abs().max().item() <= 1e-5
