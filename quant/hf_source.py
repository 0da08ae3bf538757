"""A Hugging Face model directory as a source: config.json, model.safetensors (or shards listed
in model.safetensors.index.json) and the tokenizer files. Tensors stream through `safe_open`
(memory-mapped), so only the tensor asked for is ever materialised.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .sources import TOKENIZER_FILES, ModelSource, ModelSourceError, model_config_for

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Non-persistent RoPE buffers that old transformers versions saved; recomputed from config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FLOAT_DTYPES = {"F16", "BF16", "F32"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelSourceError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"{path}: invalid JSON ({e})") from None


class HFDirectorySource(ModelSource):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelSourceError(f"{self.path}: not a directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ModelSourceError(f"{self.path}: no config.json; expected a Hugging Face model "
                                   f"directory")
        self.config = _read_json(config_path)
        if not isinstance(self.config, dict):
            raise ModelSourceError(f"{config_path}: invalid JSON (not an object)")
        self.model_config = model_config_for(self.path, self.config)
        self._files = self._weight_files()
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for file in self._files:
            for name in self._open(file).keys():
                self._file_of[name] = file
        self.fingerprint = self._fingerprint()

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelSourceError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.path / f).is_file():
                    raise ModelSourceError(f"{self.path / f}: listed in {INDEX_FILE} but missing")
            return files
        if (self.path / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        pickled = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
            p.name for p in self.path.glob("*.pt*"))
        if pickled:
            raise ModelSourceError(
                f"{self.path}: only pickled weights ({', '.join(pickled[:3])}); lowbit never "
                f"unpickles (it can run code): convert them to safetensors first")
        raise ModelSourceError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ModelSourceError(f"{self.path / file}: not a readable safetensors file, "
                                       f"truncated or corrupt ({e})") from None
        return self._handles[file]

    def _fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for file in self._files:
            st = (self.path / file).stat()
            h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def _is_extra(self, name: str) -> bool:
        # Some tied checkpoints also store lm_head.weight (a copy of the embedding); it is unused.
        return name.endswith(IGNORED_SUFFIXES) or (
            name == "lm_head.weight" and self.model_config.tie_word_embeddings)

    def tensor_names(self) -> list[str]:
        return [n for n in self._file_of if not self._is_extra(n)]

    def _file(self, name: str) -> str:
        if name not in self._file_of:
            raise ModelSourceError(f"{self.path}: tensor {name!r} is missing")
        return self._file_of[name]

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file(name)).get_slice(name).get_shape())

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read through a handle opened for this one tensor: a long-lived handle keeps every page
        it has read mapped, so streaming a 4.5 GB model through it peaked at 4.90 GB resident;
        a fresh handle per tensor peaked at 0.60 GB (benchmarks/convert_memory.py)."""
        file = self._file(name)
        self._open(file)  # a clear error for an unreadable file, once
        try:
            with safe_open(str(self.path / file), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelSourceError(f"{self.path / file}: cannot read tensor {name!r}, file "
                                   f"truncated or corrupt ({e})") from None

    def validate(self) -> None:
        for name, file in self._file_of.items():
            st_dtype = self._open(file).get_slice(name).get_dtype()
            if not self._is_extra(name) and st_dtype not in _FLOAT_DTYPES:
                raise ModelSourceError(f"{self.path / file}: tensor {name!r} has dtype "
                                       f"{st_dtype}; expected F16, BF16 or F32")
        super().validate()

    def dtype(self) -> torch.dtype:
        """config.json's torch_dtype (or transformers 5's `dtype`); float32 models and configs
        without one fall back to the embedding's file dtype, and 32-bit maps to bfloat16 (the
        range of fp32 without fp16's overflow at 65504)."""
        name = self.config.get("torch_dtype") or self.config.get("dtype")
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None or dtype == torch.float32:
            st = self._open(self._file("model.embed_tokens.weight")).get_slice(
                "model.embed_tokens.weight").get_dtype()
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(st, torch.bfloat16)
        return dtype

    def tokenizer_files(self) -> dict[str, bytes]:
        return {name: (self.path / name).read_bytes() for name in TOKENIZER_FILES
                if (self.path / name).is_file()}
