"""Text ↔ token ids for a model directory: tokenizer.json through `tokenizers`, special tokens
and the chat template from tokenizer_config.json, stop ids from generation_config.json.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer lowbit cannot load or use (missing/corrupt files, no or broken chat template)."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: not a JSON object")
    return data


def _token_text(value) -> str | None:
    """tokenizer_config stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str):
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, tokenizer_config: dict, generation_config: dict):
        self._tok = tokenizer
        self.config = tokenizer_config
        self.bos_token = _token_text(tokenizer_config.get("bos_token"))
        self.eos_token = _token_text(tokenizer_config.get("eos_token"))
        self.bos_id = self._id_of(self.bos_token)
        if self.bos_id is None and isinstance(generation_config.get("bos_token_id"), int):
            self.bos_id = generation_config["bos_token_id"]
            self.bos_token = self._tok.id_to_token(self.bos_id)
        self.add_bos = bool(tokenizer_config.get("add_bos_token", False))
        eos = generation_config.get("eos_token_id")
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self._id_of(self.eos_token) is not None:
            self.eos_ids.add(self._id_of(self.eos_token))
        self.chat_template = tokenizer_config.get("chat_template")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_file}: cannot load ({e})") from None
        return cls(tok, _read_json(path / "tokenizer_config.json"),
                   _read_json(path / "generation_config.json"))

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> "Tokenizer":
        """From a source's tokenizer_files() (a GGUF's rebuilt files need no directory)."""
        if "tokenizer.json" not in files:
            raise TokenizerError("the model has no tokenizer.json")
        try:
            tok = HFTokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"tokenizer.json: cannot load ({e})") from None
        configs = [json.loads(files[n]) if n in files else {}
                   for n in ("tokenizer_config.json", "generation_config.json")]
        return cls(tok, *configs)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; with add_special_tokens, BOS is prepended when tokenizer_config's
        add_bos_token says so (and tokenizer.json's post-processor runs, as in transformers)."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **variables) -> str:
        """Render the model's Jinja chat template in a sandbox, with transformers' variables."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (tokenizer_config.json "
                                 "chat_template); pass plain text instead")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   **variables)
        except TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None


class StreamDecoder:
    """Turns ids, one at a time, into text as soon as it is complete.

    Decodes a window from one token before the last emitted boundary (so decoders that treat the
    first token specially, like sentencepiece's leading space, see the same context) and holds
    text back while it ends in U+FFFD: a multi-byte character split across tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0   # start of the decoding window
        self._read = 0     # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(done):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """The text still held back (a trailing broken character decodes as U+FFFD)."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
