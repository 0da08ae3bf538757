"""Named model shapes for benchmarking with random weights (`lowbit bench --random NAME`).

Speed does not depend on weight values, so a shape is all a speed benchmark needs: each entry is
the architecture part of the model's HF config.json, turned into a ModelConfig by the same
`ModelConfig.from_hf` a real checkpoint goes through.
"""
from __future__ import annotations

import json
from pathlib import Path

from lowbit.quant.architecture import ModelConfig, UnsupportedModelError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

NAMED_CONFIGS: dict[str, dict] = {
    "llama-2-7b": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "llama-3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": False},
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072,
        "tie_word_embeddings": False},
    "qwen2.5-7b": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "smollm2-135m": {
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": True},
}


def named_config(name_or_path: str) -> tuple[str, ModelConfig]:
    """A named shape from NAMED_CONFIGS, or the path of an HF config.json → (label, config)."""
    if name_or_path in NAMED_CONFIGS:
        return name_or_path, ModelConfig.from_hf(NAMED_CONFIGS[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(
            f"unknown model shape {name_or_path!r}: name one of {', '.join(NAMED_CONFIGS)} "
            f"or give the path of an HF config.json")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from None
    label = path.parent.name if path.name == "config.json" else path.stem
    return label or str(path), ModelConfig.from_hf(cfg)
