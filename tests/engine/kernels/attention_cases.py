"""Shared by the decode-attention tests: tiny model configs (errors: helpers.rel_err)."""
from lowbit.quant.architecture import ModelConfig


def config(heads, kv_heads, head_dim, window=None, layers=2):
    """A Llama config of these attention shapes (Mistral with a sliding window)."""
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": heads * head_dim,
          "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 4096}
    if window is not None:
        hf.update(model_type="mistral", sliding_window=window)
    return ModelConfig.from_hf(hf)
