"""Model sources: where a 16-bit Llama-family model's config, weights and tokenizer come from.

A source hands out one tensor at a time under its Hugging Face name and in HF layout
(`(out_features, in_features)` linears, rotate_half RoPE order for q/k rows), so conversion can
stream a model larger than host memory. Two kinds exist: an HF directory (`hf_source.py`) and a
GGUF file (`gguf_source.py`); `open_source` picks one from the path. A lowbit checkpoint is not a
source (it is already quantized): callers route it with `is_lowbit_checkpoint` first.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .architecture import ModelConfig, UnsupportedModelError

LOWBIT_MARKER = "lowbit.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class ModelSourceError(ValueError):
    """A model source lowbit cannot read: missing or corrupt files, wrong shapes, an unsupported
    architecture (UnsupportedModelError is re-raised as this, prefixed with the path)."""


def is_lowbit_checkpoint(path: str | Path) -> bool:
    return (Path(path) / LOWBIT_MARKER).is_file()


def model_config_for(path: Path, config: dict) -> ModelConfig:
    try:
        return ModelConfig.from_hf(config)
    except UnsupportedModelError as e:
        raise ModelSourceError(f"{path}: {e}") from e


class ModelSource:
    """Base of every source. Subclasses set `path`, `config`, `model_config`, `fingerprint` in
    `__init__` and implement the tensor, tokenizer and dtype accessors."""

    path: Path
    config: dict
    model_config: ModelConfig
    fingerprint: str

    def tensor_names(self) -> list[str]:
        raise NotImplementedError

    def get_tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The shape of `name` without loading it (subclasses read it from file headers)."""
        return tuple(self.get_tensor(name).shape)

    def tokenizer_files(self) -> dict[str, bytes]:
        raise NotImplementedError

    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def validate(self) -> None:
        """Every tensor ModelConfig expects is present with its shape, and nothing else is."""
        expected = self.model_config.tensor_shapes()
        names = set(self.tensor_names())
        for name in names:
            if name not in expected:
                raise ModelSourceError(f"{self.path}: unexpected tensor {name!r} for a "
                                       f"{self.model_config.model_type} model of this config")
        for name, shape in expected.items():
            if name not in names:
                raise ModelSourceError(f"{self.path}: tensor {name!r} is missing")
            found = self.tensor_shape(name)
            if found != tuple(shape):
                raise ModelSourceError(f"{self.path}: tensor {name!r} has shape {list(found)}, "
                                       f"config.json implies {list(shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def open_source(path: str | Path | None) -> ModelSource:
    """None → the embedded default model (its cached HF directory); a directory with config.json
    → HFDirectorySource; a `.gguf` file → GGUFSource."""
    from .gguf_source import GGUFSource
    from .hf_source import HFDirectorySource

    if path is None:
        from .default_model import default_model_dir
        return HFDirectorySource(default_model_dir())
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelSourceError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_lowbit_checkpoint(path):
            raise ModelSourceError(f"{path} is a lowbit checkpoint (it has {LOWBIT_MARKER}), not "
                                   f"a 16-bit model source: load it as a checkpoint")
        return HFDirectorySource(path)
    if path.suffix.lower() == ".gguf":
        return GGUFSource(path)
    raise ModelSourceError(f"{path}: expected a Hugging Face model directory (with config.json) "
                           f"or a .gguf file")
