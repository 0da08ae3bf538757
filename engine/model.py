"""The Llama-family transformer: plain modules with nn.Linear and HF tensor names.

The model knows nothing of quantization: QuantizedLinear is swapped in for nn.Linear at load time,
and the KV cache (16-bit or quantized) is passed in. Module names equal the HF checkpoint's
(`model.layers.0.self_attn.q_proj`), so state_dict keys are the safetensors names.

The elementwise work runs through registry ops (rms_norm, add_rms_norm, rotary_update, silu_mul): the
torch reference on CPU, one fused Triton launch each on CUDA. Each residual add is fused into
the norm after it; after the MLP that norm is the next layer's (or the final one), so a layer
returns the pair (residual, delta) whose sum is its output (DecoderLayer.forward_pair).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.engine.kernels import registry
from lowbit.engine.rope import Rotary
from lowbit.quant.architecture import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return registry.dispatch("rms_norm", x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None):
        """(x + delta, norm(x + delta)) in one op; delta None: (x, norm(x))."""
        if delta is None:
            return x, self(x)
        return registry.dispatch("add_rms_norm", x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def project(self, x):
        """x (B, T, hidden) → q (B, T, H*D), k, v (B, T, Hkv*D); one matmul once fused."""
        if hasattr(self, "qkv_proj"):  # engine/fuse.py
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, positions, cache, kv_len):
        b, t, _ = x.shape
        q, k, v = self.project(x)
        # rotated q (B, H, T, D), k and v (B, Hkv, T, D); k and v written to the cache
        q, k, v = registry.dispatch("rotary_update", q, k, v, cos, sin, cache, self.layer_idx,
                                    positions)
        out = registry.dispatch("kv_attention", q, cache, self.layer_idx, positions, kv_len, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, H*D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # engine/fuse.py
            return self.down_proj(registry.dispatch("silu_mul", self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, cache, kv_len):
        """x (B, T, hidden) → the layer's output (B, T, hidden)."""
        residual, delta = self.forward_pair(x, None, cos, sin, positions, cache, kv_len)
        return residual + delta

    def forward_pair(self, residual, delta, cos, sin, positions, cache, kv_len):
        """The layer on input residual + delta (delta None: residual alone); returns the pair
        (residual, delta) whose sum is the output, leaving that add to the next norm."""
        residual, h = self.input_layernorm.add_forward(residual, delta)
        attn = self.self_attn(h, cos, sin, positions, cache, kv_len)
        residual, h = self.post_attention_layernorm.add_forward(residual, attn)
        return residual, self.mlp(h)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """forward(tokens (B, T), positions (T,), cache, kv_len) → logits (B, T, V).

    `positions` are the absolute positions of the T new tokens (contiguous). `kv_len` is how many
    cache positions attention reads (max position + 1); None reads the whole preallocated cache
    under a mask, the static-shape form a CUDA graph needs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.rotary = Rotary(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def tie_weights(self):
        """Tied models read lm_head from the embedding table: one tensor, not two."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, tokens, positions, cache, kv_len=None):
        residual = self.model.embed_tokens(tokens)  # (B, T, H)
        cos, sin = self.rotary(positions, residual.dtype)
        delta = None
        for layer in self.model.layers:
            residual, delta = layer.forward_pair(residual, delta, cos, sin, positions, cache,
                                                 kv_len)
        return self.model.norm.add_forward(residual, delta)[1]

    def forward(self, tokens, positions, cache, kv_len=None, last_only=False):
        h = self.hidden_states(tokens, positions, cache, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)
