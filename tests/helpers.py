"""Test helpers shared across the suite: tiny random Llama-family HF directories.

Import as `from helpers import write_tiny_llama` (tests/conftest.py puts tests/ on sys.path).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TINY_VOCAB = 320  # 256 byte symbols + a few merges + 3 specials; enough to cover any text
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Quantization trades a little accuracy for a lot of memory bandwidth.",
    "naïve café — 東京 🙂 1234567890",
]


def tiny_tokenizer(vocab: int = TINY_VOCAB) -> Tokenizer:
    """A byte-level BPE with `vocab` tokens (specials first, ids 0..2), trained on a few lines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TRAINING_TEXT, trainer)
    return tok


def tiny_config(*, model_type: str = "llama", vocab: int = TINY_VOCAB, hidden: int = 64,
                layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                tie: bool = False, qkv_bias: bool = False, rope_scaling: dict | None = None,
                dtype: torch.dtype = torch.float32) -> dict:
    """An HF config.json dict for a tiny model of `model_type`."""
    cfg = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}.get(model_type, "GPT2LMHeadModel")],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "llama":
        cfg["attention_bias"] = qkv_bias
        cfg["mlp_bias"] = False
    return cfg


def tiny_state_dict(cfg: dict, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for `cfg` (std 0.02 linears, norms near 1), HF names and layouts."""
    from lowbit.quant.architecture import ModelConfig

    mc = ModelConfig.from_hf(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in mc.tensor_shapes().items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        tensors[name] = t.to(dtype).contiguous()
    return tensors


def write_tiny_llama(dir: Path, *, model_type: str = "llama", vocab: int = TINY_VOCAB,
                     hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128, tie: bool = False, qkv_bias: bool = False,
                     rope_scaling: dict | None = None, dtype: torch.dtype = torch.float32,
                     seed: int = 0) -> Path:
    """Write a tiny random HF model directory: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (ChatML template) and generation_config.json. Returns `dir`.

    `model_type` other than llama/mistral/qwen2 writes only config.json + tokenizer files (the
    weights of an unsupported architecture have no defined names here). `vocab` must be ≥ 259
    for the tokenizer (256 bytes + 3 specials); the tokenizer has min(vocab, TINY_VOCAB) ids.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(model_type=model_type, vocab=vocab, hidden=hidden, layers=layers,
                      heads=heads, kv_heads=kv_heads, intermediate=intermediate, tie=tie,
                      qkv_bias=qkv_bias, rope_scaling=rope_scaling, dtype=dtype)
    (dir / "config.json").write_text(json.dumps(cfg, indent=2))
    if model_type in ("llama", "mistral", "qwen2"):
        save_file(tiny_state_dict(cfg, dtype=dtype, seed=seed),
                  str(dir / "model.safetensors"), metadata={"format": "pt"})
    tiny_tokenizer(min(vocab, TINY_VOCAB)).save(str(dir / "tokenizer.json"))
    (dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": [2, 0]}, indent=2))
    return dir
