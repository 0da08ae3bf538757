"""A GGUF file (llama.cpp's format) as a source: the HF config rebuilt from its metadata, its
tensors dequantized to float16 under HF names and in HF layout, its tokenizer rebuilt from
metadata (`gguf_tokenizer.py`). Only general.architecture "llama" is read.

Layout notes:
- GGUF lists dims fastest-first (`[in, out]` for a linear); the numpy array `gguf` hands out is
  already `(out, in_bytes)` row-major, and dequantizing gives `(out, in)`: torch order.
- llama.cpp's converter permutes the rows of q_proj/k_proj within each head from HF's
  rotate_half order (first half of the head dims, then second) to interleaved pairs; we undo it.
- Every tensor comes back float16, norms included (one dtype for the whole model). fp16 holds a
  Q4_1 value d*q + m (d, m stored as fp16) with 11 significant bits, bf16 with 8 only.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from .sources import ModelSource, ModelSourceError, model_config_for

SUPPORTED_ARCHS = ("llama",)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_IGNORED = ("rope_freqs.weight",)  # llama3 rope factors; rebuilt from config's rope_scaling


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None if it has none (unknown tensors are refused)."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head, rows come as interleaved pairs
    (d0, d_half, d1, d_half+1, ...); HF's rotate_half wants (d0, d1, ..., d_half, ...)."""
    out_f = w.shape[0]
    head_dim = out_f // n_heads
    rest = w.shape[1:]
    w = w.reshape(n_heads, head_dim // 2, 2, *rest)  # (H, D/2, 2, in)
    return w.transpose(1, 2).reshape(out_f, *rest)   # (H, 2, D/2, in) → (H*D, in)


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-06 → 1e-05)."""
    return float(f"{float(value):.7g}")


def gguf_fingerprint(path: Path) -> str:
    """sha256 of the size, the first 8 MiB (the metadata and tensor table: 1.8 MB in the default
    model) and the last 1 MiB: identifies a GGUF in ~10 ms without parsing it (2 s) or hashing
    all of it."""
    head, tail = 8 << 20, 1 << 20
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(head))
        if size > head:
            f.seek(max(head, size - tail))
            h.update(f.read())
    return h.hexdigest()[:16]


class GGUFMetadata:
    """Typed access to a GGUFReader's key-value fields."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ModelSourceError(f"{self.path}: GGUF metadata lacks {key!r}")
        return value


class GGUFSource(ModelSource):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._reader = GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise ModelSourceError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.meta = GGUFMetadata(self._reader, self.path)
        arch = self.meta.require("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelSourceError(f"{self.path}: GGUF architecture {arch!r} is not supported; "
                                   f"lowbit reads GGUF files of: {', '.join(SUPPORTED_ARCHS)}")
        self._tensors = {}
        for t in self._reader.tensors:
            if t.name in _IGNORED:
                continue
            name = hf_name(t.name)
            if name is None:
                raise ModelSourceError(f"{self.path}: unexpected GGUF tensor {t.name!r}")
            self._tensors[name] = t
        self.config = self._hf_config(arch)
        self.model_config = model_config_for(self.path, self.config)
        self.fingerprint = gguf_fingerprint(self.path)

    def _hf_config(self, arch: str) -> dict:
        m = self.meta
        hidden = int(m.require(f"{arch}.embedding_length"))
        heads = int(m.require(f"{arch}.attention.head_count"))
        tokens = m.get("tokenizer.ggml.tokens")
        embd = self._tensors.get("model.embed_tokens.weight")
        vocab = len(tokens) if tokens is not None else (
            int(embd.shape[-1]) if embd is not None else int(m.require(f"{arch}.vocab_size")))
        head_dim = int(m.get(f"{arch}.attention.key_length", hidden // heads))
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(m.require(f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(m.require(f"{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(m.get(f"{arch}.attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "max_position_embeddings": int(m.get(f"{arch}.context_length", 2048)),
            "rms_norm_eps": _f32(m.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _f32(m.get(f"{arch}.rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(arch),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "mlp_bias": False,
            "hidden_act": "silu",
            "torch_dtype": "float16",
        }
        for key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                              ("eos_token_id", "tokenizer.ggml.eos_token_id")):
            if m.get(meta_key) is not None:
                cfg[key] = int(m.get(meta_key))
        return cfg

    def _rope_scaling(self, arch: str) -> dict | None:
        kind = self.meta.get(f"{arch}.rope.scaling.type")
        if kind in (None, "none"):
            if "rope_freqs.weight" in {t.name for t in self._reader.tensors}:
                raise ModelSourceError(f"{self.path}: llama3 RoPE factors (rope_freqs) without "
                                       f"their parameters in metadata are not supported")
            return None
        if kind == "linear":
            return {"rope_type": "linear",
                    "factor": float(self.meta.require(f"{arch}.rope.scaling.factor"))}
        raise ModelSourceError(f"{self.path}: GGUF rope scaling {kind!r} is not supported")

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise ModelSourceError(f"{self.path}: tensor {name!r} is missing")
        return self._tensors[name]

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelSourceError(f"{self.path}: tensor {t.name!r} uses GGUF type "
                                   f"{t.tensor_type.name}, which cannot be dequantized ({e})") from None
        w = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the memmap is read-only
        w = w.reshape(self.tensor_shape(name))
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            w = unpermute_rope_rows(w, self.model_config.num_heads)
        elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            w = unpermute_rope_rows(w, self.model_config.num_kv_heads)
        return w.to(torch.float16).contiguous()

    def dtype(self) -> torch.dtype:
        return torch.float16

    def tokenizer_files(self) -> dict[str, bytes]:
        from .gguf_tokenizer import tokenizer_files_from_gguf
        return tokenizer_files_from_gguf(self.meta, self.model_config)
