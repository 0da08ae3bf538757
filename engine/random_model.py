"""A Transformer of a given shape with random weights, for speed benchmarks.

Speed does not depend on weight values. Every tensor is drawn directly on the target device in
the target dtype, and each linear is quantized right after its 16-bit weight is drawn, so peak
memory is the model in its final format plus one 16-bit weight matrix (a Llama-3-8B int4 model
never holds its 15 GB of bf16 linears, on the GPU or the host).
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.engine.bnb_linear import BnbLinear
from lowbit.engine.fuse import fuse_projections
from lowbit.engine.linear import QuantizedLinear
from lowbit.engine.model import Transformer
from lowbit.engine.rope import inverse_frequencies
from lowbit.quant.architecture import ModelConfig
from lowbit.quant.bnb import quantize_bnb
from lowbit.quant.config import BNB_METHODS, QuantConfig
from lowbit.quant.quantize import quantize_weight

WEIGHT_STD = 0.02  # the usual Llama init; keeps activations finite through random layers


def _draw(shape, device, dtype, gen) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, WEIGHT_STD, generator=gen)


def _materialize(module: nn.Module, device, dtype, gen) -> None:
    """Replace `module`'s own meta parameters by random ones on `device` (norm weights: ones)."""
    for name, p in list(module._parameters.items()):
        if p is None or p.device.type != "meta":
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)):
            t = _draw(p.shape, device, dtype, gen)
        else:
            t = torch.ones(p.shape, device=device, dtype=dtype)
        module._parameters[name] = nn.Parameter(t, requires_grad=False)


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None,
                     quant: QuantConfig) -> nn.Module:
    """The module that holds `weight` quantized as `quant` asks (by bitsandbytes for bnb-*)."""
    if quant.method in BNB_METHODS:
        return BnbLinear(quantize_bnb(weight, quant.method), bias)
    return QuantizedLinear.from_format(quantize_weight(weight, quant), bias)


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 quant: QuantConfig | None = None, seed: int = 0) -> Transformer:
    """`cfg`'s Transformer with N(0, 0.02) weights (norms 1) on `device`, linears quantized to
    `quant` (None: 16-bit), in eval mode."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, module in list(model.named_modules()):
        if name == "lm_head" and cfg.tie_word_embeddings:
            continue  # the embedding's table: tied or quantized from it below
        if isinstance(module, nn.Linear) and quant is not None and not quant.keeps_16bit(name):
            weight = _draw(module.weight.shape, device, dtype, gen)
            bias = None if module.bias is None else _draw(module.bias.shape, device, dtype, gen)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    quantized_linear(weight, bias, quant.for_module(name)))
            del weight
        else:
            _materialize(module, device, dtype, gen)
    model.rotary.inv_freq = inverse_frequencies(cfg).to(device)  # fp32 whatever the model dtype
    if cfg.tie_word_embeddings:
        if quant is not None and not quant.stays_16bit("lm_head", tied_embeddings=True):
            model.lm_head = quantized_linear(model.model.embed_tokens.weight, None,
                                             quant.for_module("lm_head"))
        else:
            model.tie_weights()
    fuse_projections(model)
    return model.eval()
