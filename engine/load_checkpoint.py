"""A lowbit checkpoint → a ready Transformer with QuantizedLinear modules, plus its tokenizer.

The model is built on the meta device and every tensor is materialised once, straight from the
checkpoint onto the target device: quantized linears are wrapped (QuantizedLinear.from_format,
no 16-bit weight ever allocated), the rest (embedding, norms, 16-bit linears, biases) is cast to
the run dtype. `empty_model` would first allocate the full 16-bit model on the device (16 GB for
an 8B model in bf16) only to free the linears again, which is what a checkpoint exists to avoid.

Scales keep the checkpoint's 16-bit dtype whatever the run dtype (the kernels convert them), so
the quantized weights are exactly those that were written. Every tensor is copied out of the
memory-mapped file, on the CPU too: safetensors offsets align a tensor only to its element size,
and torch's `_weight_int8pack_mm` segfaults on an int8 weight that is not 64-byte aligned
(measured: offset 1 crashes, a fresh allocation runs); copies also leave the model independent of
the file, which a later `convert --force` may replace.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.engine.bnb_linear import BnbLinear
from lowbit.engine.linear import QuantizedLinear
from lowbit.engine.load import LoadedModel, resolve_dtype
from lowbit.engine.model import Transformer
from lowbit.engine.rope import inverse_frequencies
from lowbit.engine.tokenizer import Tokenizer
from lowbit.quant.bnb import bnb_from_tensors
from lowbit.quant.checkpoint import CheckpointError, read_checkpoint
from lowbit.quant.config import BNB_METHODS


def _set(model: nn.Module, name: str, value: nn.Module | nn.Parameter) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, value)


def _owned(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.to(device=device, dtype=dtype or t.dtype, copy=True)


def load_lowbit_checkpoint(path: Path, device: torch.device, dtype: str) -> LoadedModel:
    ckpt = read_checkpoint(path)
    cfg = ckpt.model_config
    dt = resolve_dtype(dtype, device, ckpt.dtype, quantized=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    quantized = ckpt.quantized_linears()
    for module in quantized:
        stored = ckpt.linear_format(module)
        owned = {k: _owned(v, device) for k, v in stored.tensors().items()}
        bias = None
        if cfg.has_bias(module):
            bias = _owned(ckpt.get_tensor(f"{module}.bias"), device, dt)
        if ckpt.quant.method in BNB_METHODS:  # bitsandbytes' formats run in its own modules
            fmt = bnb_from_tensors(ckpt.quant.method, owned, stored.out_features,
                                   stored.in_features, stored.dtype)
            _set(model, module, BnbLinear(fmt, bias))
            continue
        fmt = type(stored).from_tensors(owned, stored.group_size, stored.in_features,
                                        stored.symmetric)
        _set(model, module, QuantizedLinear.from_format(fmt, bias))
    tied_16bit_head = cfg.tie_word_embeddings and "lm_head" not in quantized
    for name, _ in list(model.named_parameters()):
        if name == "lm_head.weight" and tied_16bit_head:
            continue  # tied below to the embedding
        t = _owned(ckpt.get_tensor(name), device, dt)
        _set(model, name, nn.Parameter(t, requires_grad=False))
    if tied_16bit_head:
        model.tie_weights()
    model.rotary.inv_freq = inverse_frequencies(cfg).to(device)  # fp32 whatever the model dtype
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: the checkpoint left {leftover[0]!r} unfilled")
    model.eval()
    ckpt.close()
    return LoadedModel(model, Tokenizer.from_dir(path), cfg, str(path), ckpt.quant, device, dt)
