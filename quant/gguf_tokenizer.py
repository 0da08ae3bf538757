"""Rebuild HF tokenizer files (tokenizer.json, tokenizer_config.json, generation_config.json)
from a GGUF file's tokenizer.ggml.* metadata.

Only byte-level BPE vocabularies (tokenizer.ggml.model "gpt2") are rebuilt; sentencepiece
("llama") and others are refused. The text is split before BPE exactly as llama.cpp splits it
for tokenizer.ggml.pre, since merges learned on one split give different ids on another.
"""
from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .architecture import ModelConfig
from .sources import ModelSourceError

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's split, used by SmolLM/StarCoder after first isolating every digit.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's split: case-insensitive contractions, digits in runs of at most three.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre → the regexes llama.cpp applies in order, each isolating its matches.
PRE_TOKENIZER_SPLITS = {
    "default": [_GPT2_SPLIT],
    "gpt-2": [_GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "refact": [r"\p{N}", _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-v3": [_LLAMA3_SPLIT],
}


def build_bpe_tokenizer(tokens: list[str], merges: list[str], token_types: list[int] | None,
                        pre: str) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer`: ids are positions in `tokens`; CONTROL tokens
    (and UNKNOWN) become special added tokens, USER_DEFINED ones plain added tokens."""
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ModelSourceError(f"GGUF pre-tokenizer {pre!r} is not supported; lowbit knows "
                               f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelSourceError(f"GGUF merge {merge!r} is not a pair")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if token_types is not None:
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(token_types) if t in (CONTROL, UNKNOWN)]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(token_types) if t == USER_DEFINED]
        tok.add_special_tokens(special)
        tok.add_tokens(user)
    return tok


def tokenizer_files_from_gguf(meta, model_config: ModelConfig) -> dict[str, bytes]:
    """`meta` is a gguf_source.GGUFMetadata. Returns the three HF tokenizer files as bytes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelSourceError(f"{meta.path}: GGUF tokenizer model {kind!r} is not supported; "
                               f"lowbit rebuilds byte-level BPE ('gpt2') tokenizers only")
    tokens = list(meta.require("tokenizer.ggml.tokens"))
    merges = list(meta.require("tokenizer.ggml.merges"))
    token_types = meta.get("tokenizer.ggml.token_type")
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok = build_bpe_tokenizer(tokens, merges, None if token_types is None else list(token_types), pre)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "model_max_length": model_config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    gen_config = {}
    for key in ("bos_token_id", "eos_token_id"):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            gen_config[key] = int(meta.get(f"tokenizer.ggml.{key}"))
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) != gen_config.get("eos_token_id"):
        # Chat models end a turn with EOT (e.g. <|eot_id|>); generation must stop there too.
        gen_config["eos_token_id"] = [gen_config["eos_token_id"], int(eot)] \
            if "eos_token_id" in gen_config else int(eot)
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(tok_config, indent=2, ensure_ascii=False).encode(),
        "generation_config.json": json.dumps(gen_config, indent=2).encode(),
    }
