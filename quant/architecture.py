"""The Llama family as lowbit understands it: HF config.json → ModelConfig, and the name and
shape of every tensor such a model must have.

Llama 2/3/3.x, Mistral, Qwen2/2.5 and SmolLM share one layout (pre-norm RMSNorm, RoPE, GQA,
SwiGLU); they differ only in biases, RoPE scaling, tied embeddings and the sliding window, all
read from config.json here. Anything else is refused with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = (None, "default", "llama3", "linear")


class UnsupportedModelError(ValueError):
    """The model is not a Llama-family architecture lowbit can run; the message says why."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures") or [model_type]
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); lowbit runs "
                f"the Llama family: {', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            # transformers 5 moved rope_theta/rope_scaling into rope_parameters
            rope_params = cfg.get("rope_parameters") or {}
            rope_scaling = cfg.get("rope_scaling") or None
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
            rope_type = None
            if rope_scaling:
                rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(f"unsupported rope_scaling type {rope_type!r}; "
                                            f"lowbit supports llama3 and linear")
            if rope_type == "default":
                rope_scaling = None
            if model_type == "qwen2":
                qkv_bias, o_bias = True, False
                window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
            else:
                qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
                window = cfg.get("sliding_window") if model_type == "mistral" else None
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
                rope_scaling=dict(rope_scaling) if rope_scaling else None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
            )
        except KeyError as e:
            raise UnsupportedModelError(f"config.json lacks the field {e.args[0]!r}") from None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module name → (out_features, in_features) for every linear layer, in file order."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {}
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            shapes[p + "self_attn.q_proj"] = (self.q_size, h)
            shapes[p + "self_attn.k_proj"] = (self.kv_size, h)
            shapes[p + "self_attn.v_proj"] = (self.kv_size, h)
            shapes[p + "self_attn.o_proj"] = (h, self.q_size)
            shapes[p + "mlp.gate_proj"] = (i, h)
            shapes[p + "mlp.up_proj"] = (i, h)
            shapes[p + "mlp.down_proj"] = (h, i)
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.vocab_size, h)
        return shapes

    def has_bias(self, linear_name: str) -> bool:
        if linear_name.endswith(("q_proj", "k_proj", "v_proj")):
            return self.qkv_bias
        if linear_name.endswith("o_proj"):
            return self.o_bias
        if linear_name.startswith("model.layers."):
            return self.mlp_bias
        return False

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the 16-bit HF checkpoint: name → shape."""
        h = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for n in range(self.num_layers):
            shapes[f"model.layers.{n}.input_layernorm.weight"] = (h,)
            shapes[f"model.layers.{n}.post_attention_layernorm.weight"] = (h,)
        for name, (out_f, in_f) in self.linear_shapes().items():
            shapes[name + ".weight"] = (out_f, in_f)
            if self.has_bias(name):
                shapes[name + ".bias"] = (out_f,)
        shapes["model.norm.weight"] = (h,)
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total
