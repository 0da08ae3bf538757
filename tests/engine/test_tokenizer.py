import json

import pytest
from helpers import write_tiny_llama

from lowbit.engine.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXT = ("Quantized weights read fewer bytes. naïve café — 東京 🙂 and 🇯🇵 flags, "
        "Ελληνικά, 한국어, emoji 👩‍👩‍👧 at the end 🙂")


@pytest.fixture
def tiny_dir(tmp_path):
    return write_tiny_llama(tmp_path)


@pytest.fixture
def tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


def test_round_trip(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) > 20


def test_bos_only_when_config_says_so(tiny_dir, tok):
    assert tok.bos_id == 0
    assert tok.encode("hi")[0] != 0
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with_bos = Tokenizer.from_dir(tiny_dir)
    assert with_bos.encode("hi") == [0] + tok.encode("hi")
    assert with_bos.encode("hi", add_special_tokens=False) == tok.encode("hi")


def test_eos_ids_from_both_configs(tiny_dir, tok):
    # generation_config [2, 0] and tokenizer_config eos_token <|im_end|> (id 2)
    assert tok.eos_ids == {0, 2}
    (tiny_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    assert Tokenizer.from_dir(tiny_dir).eos_ids == {1, 2}


def test_special_tokens_are_atomic(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_stream_decoder_never_breaks_a_character(tok):
    ids = tok.encode(TEXT)
    # byte-level BPE splits the multi-byte characters over several ids: the hard case
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = StreamDecoder(tok)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in c for c in chunks)
    assert sum(1 for c in chunks if c) > 10


def test_stream_decoder_flush_returns_held_text(tok):
    ids = tok.encode("ab 🙂")
    stream = StreamDecoder(tok)
    text = "".join(stream.push(i) for i in ids[:-1])
    assert "\ufffd" not in text
    assert text + stream.push(ids[-1]) + stream.flush() == "ab 🙂"


def test_chat_template_renders_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi 🙂"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")


def test_chat_template_sandbox_and_errors(tiny_dir):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% if messages|length > 1 %}{{ raise_exception('one message only') }}"
                            "{% endif %}{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}")
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == \
        "<|endoftext|>x<|im_end|>"
    with pytest.raises(TokenizerError, match="one message only"):
        tok.apply_chat_template([{"role": "user", "content": "x"}] * 2)
    cfg["chat_template"] = "{{ messages.append(1) }}"
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="chat template failed"):
        Tokenizer.from_dir(tiny_dir).apply_chat_template([])


def test_missing_or_corrupt_files(tmp_path, tiny_dir):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tiny_dir / "tokenizer.json").write_text("{")
    with pytest.raises(TokenizerError, match="cannot load"):
        Tokenizer.from_dir(tiny_dir)


def test_no_chat_template(tiny_dir):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(tiny_dir).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.slow
def test_default_model_tokenizer_streams_and_renders_smollm2_chat(tmp_path):
    from lowbit.quant.default_model import default_gguf_path
    from lowbit.quant.sources import open_source

    # the tokenizer files alone, without building the 16-bit weight cache
    for name, data in open_source(default_gguf_path()).tokenizer_files().items():
        (tmp_path / name).write_bytes(data)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id == 1 and tok.eos_ids == {2} and not tok.add_bos
    ids = tok.encode(TEXT)
    stream = StreamDecoder(tok)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == TEXT and not any("\ufffd" in c for c in chunks)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
