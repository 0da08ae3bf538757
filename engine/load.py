"""Model source or lowbit checkpoint → a ready Transformer on a device, plus its tokenizer.

Weights are copied tensor by tensor into a model allocated directly on the target device, so host
memory never holds a second full copy. Quantization is a module swap after loading (or, for a
lowbit checkpoint, before: its QuantizedLinear buffers are filled from the file).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.engine.fuse import fuse_projections
from lowbit.engine.linear import swap_linears
from lowbit.engine.model import Transformer
from lowbit.engine.rope import inverse_frequencies
from lowbit.engine.tokenizer import Tokenizer
from lowbit.quant.architecture import ModelConfig
from lowbit.quant.config import QuantConfig
from lowbit.quant.sources import ModelSource, is_lowbit_checkpoint, open_source

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class LoadError(ValueError):
    """The model could not be loaded as asked (bad device, dtype, ...)."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    source: str  # what was loaded, for reports
    quant: QuantConfig | None  # None = 16-bit weights
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LoadError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("--device cuda was asked for, but torch sees no CUDA device")
    return dev


def resolve_dtype(name: str, device: torch.device, stored: torch.dtype,
                  quantized: bool = False) -> torch.dtype:
    """"auto": on CUDA the stored 16-bit dtype. On CPU fp32 for 16-bit weights (many CPUs lack
    bf16 matrix units), but bf16 for quantized ones: torch's packed int4/int8 CPU kernels run in
    bf16 only, and the fp32 fallback dequantizes every weight per call (SmolLM2-135M int4 g128,
    one thread on this 2-core box: 51 ms per decode step in bf16 against 1.28 s in fp32)."""
    if name == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if quantized else torch.float32
        return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16
    if name not in DTYPES:
        raise LoadError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    return DTYPES[name]


def empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A Transformer with uninitialised storage on `device` (nothing is computed twice)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.inv_freq = inverse_frequencies(cfg).to(device)  # fp32 whatever the model dtype
    return model


def fill_from_source(model: Transformer, source: ModelSource, dtype: torch.dtype) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in source.tensor_names():
        if name in params:
            params[name].data.copy_(source.get_tensor(name).to(dtype))
    model.tie_weights()


def load_model(path: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
               quant: QuantConfig | None = None, fuse: bool = True) -> LoadedModel:
    """Load an HF directory, a GGUF file, a lowbit checkpoint, or (None) the default model.

    `quant` quantizes a 16-bit source on the fly (a module swap after loading); a lowbit
    checkpoint is already quantized and refuses it. `fuse` stacks q/k/v and gate/up into one
    linear each (engine/fuse.py); code that hooks individual projections passes False.
    """
    dev = resolve_device(device)
    if path is not None and is_lowbit_checkpoint(Path(path)):
        from lowbit.engine.load_checkpoint import load_lowbit_checkpoint
        if quant is not None and quant.weight_bits != 16:
            raise LoadError(f"{path} is already quantized ({quant.name} was asked for on top)")
        loaded = load_lowbit_checkpoint(Path(path), dev, dtype)
        if fuse:
            fuse_projections(loaded.model)
        return loaded
    source = open_source(path)
    source.validate()
    cfg = source.model_config
    quantized = quant is not None and quant.weight_bits != 16
    dt = resolve_dtype(dtype, dev, source.dtype(), quantized)
    model = empty_model(cfg, dev, dt)
    fill_from_source(model, source, dt)
    if quantized:
        swap_linears(model, quant)
    else:
        quant = None
    if fuse:
        fuse_projections(model)
    model.eval()
    tokenizer = Tokenizer.from_files(source.tokenizer_files())
    return LoadedModel(model, tokenizer, cfg, str(source.path), quant, dev, dt)
