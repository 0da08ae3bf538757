"""Test helpers shared across the suite: tiny random Llama-family HF directories.

Import as `from helpers import write_tiny_llama` (tests/conftest.py puts tests/ on sys.path).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
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


_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                      "lm_head": "output"}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for an HF Llama tensor name (written independently of lowbit's mapping)."""
    base, _, kind = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    return f"{_GGUF_GLOBAL_NAMES[base]}.{kind}"


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row permutation (HF rotate_half order → interleaved pairs)."""
    out_f = w.shape[0]
    return (w.reshape(n_heads, 2, out_f // n_heads // 2, *w.shape[1:])  # (H, 2, D/2, in)
            .transpose(1, 2).reshape(w.shape))


def write_tiny_gguf(path: Path, hf_dir: Path, *, arch: str = "llama", qtype: str = "Q8_0",
                    tokenizer_model: str = "gpt2", pre: str = "gpt2") -> Path:
    """Write the tiny HF model in `hf_dir` (from write_tiny_llama) as a GGUF at `path`, the way
    llama.cpp's converter does: permuted q/k rows, 2-D weights in `qtype` (F32/F16/Q8_0/Q4_0/
    Q4_1; rows must be multiples of 32 for block types), norms F32, the tokenizer in metadata."""
    import gguf
    from safetensors.torch import load_file

    path, hf_dir = Path(path), Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m
                             for m in tok["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    quant = gguf.GGMLQuantizationType[qtype]
    for name, t in tensors.items():
        t = t.float()
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            t = llama_cpp_permute(t, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            t = llama_cpp_permute(t, cfg["num_key_value_heads"])
        data = t.numpy()
        if t.ndim == 2 and quant not in (gguf.GGMLQuantizationType.F32,):
            data = gguf.quants.quantize(data, quant)
            writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=quant)
        else:
            writer.add_tensor(gguf_tensor_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_one_line_error(result, *fragments):
    """A click result that failed with one "Error: ..." line (no traceback) naming `fragments`."""
    assert result.exit_code != 0
    text = result.stderr or result.output
    assert "Traceback" not in text
    lines = [ln for ln in text.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def cache_test_device_limits() -> None:
    """Fixed CPU limits written to the device-limits cache (the folder LOWBIT_CACHE names, which
    the caller sets first), so no test spends seconds measuring them."""
    from lowbit.engine import device_limits
    limits = device_limits.DeviceLimits(
        device_limits.device_name("cpu"), "test", copy_GBps=20.0, matmul_TFLOPs=0.1,
        matmul_dtype="float32", measured="2025-01-01T00:00:00+00:00")
    device_limits._write_cache(device_limits.cache_path(),
                               {device_limits.cache_key("cpu"): limits.__dict__})


@contextlib.contextmanager
def one_torch_thread():
    """torch on one CPU thread inside the block (the previous count restored after): tiny models'
    thousands of small ops run slower with OpenMP wake-ups on a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rel_err(got, want) -> float:
    """Relative Frobenius error in fp64; a non-finite output fails outright."""
    assert torch.isfinite(got).all()
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def triton_gpu_only():
    """skipif mark for tests of compiled Triton kernels: CUDA, with TRITON_INTERPRET unset or 0.
    A function, not a module constant: it must read the variable after the test module's own
    `os.environ.setdefault("TRITON_INTERPRET", "1")`."""
    return pytest.mark.skipif(not torch.cuda.is_available()
                              or os.environ.get("TRITON_INTERPRET") == "1",
                              reason="needs CUDA with TRITON_INTERPRET unset or 0")


_SM90_BUILD = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def build(fn, pointers, consts, num_warps=4, floats=("qk_scale",)):
    """fn compiled for an H100: consts its constexprs, pointers the element types of its *_ptr
    arguments (bf16 unless named), fp32 the arguments named in floats, i32 the rest."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "bf16")
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})
'''


def run_sm90_compile(body: str):
    """Run `body` in a fresh Python with the interpreter off (Triton reads TRITON_INTERPRET when
    imported) after a prelude defining build(fn, pointers, consts, num_warps, floats), which
    compiles for sm_90 without a GPU; returns the subprocess.CompletedProcess."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", _SM90_BUILD + body], env=env,
                          capture_output=True, text=True, timeout=300)
