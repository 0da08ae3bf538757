"""Fuse q/k/v and gate/up into one linear each, after loading.

At batch 1 a decode step is ~7 matmul launches a layer; k_proj and v_proj of Llama-3-8B are
1024 x 4096 (8 MB in bf16, 2 MB in int4): too small to fill 132 SMs alone. One (q|k|v) matmul and
one (gate|up) matmul read the same bytes in 2 launches instead of 5, with wider grids. Quantized
weights concatenate exactly: groups run along the input dimension, so stacking output rows keeps
every row's integers, scales and zero points.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.engine.linear import QuantizedLinear


def _stack_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One module computing the concatenated outputs of `linears`, or None where they cannot be
    stacked (different kinds or formats, e.g. a keep-8bit layer beside int4 ones)."""
    first = linears[0]
    biases = [m.bias for m in linears]
    if any((b is None) != (biases[0] is None) for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if all(type(m) is nn.Linear for m in linears):
        fused = nn.Linear(first.in_features, sum(m.out_features for m in linears),
                          bias=bias is not None, device=first.weight.device,
                          dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in linears]))
            if bias is not None:
                fused.bias.copy_(bias)
        return fused
    if all(type(m) is QuantizedLinear for m in linears):
        key = {(m.bits, m.group_size, m.symmetric, m.in_features) for m in linears}
        if len(key) != 1:
            return None
        fmts = [m.weight_format for m in linears]
        tensors = {name: torch.cat([f.tensors()[name] for f in fmts])
                   for name in fmts[0].tensors()}
        fmt = type(fmts[0]).from_tensors(tensors, first.group_size, first.in_features,
                                         first.symmetric)
        return QuantizedLinear.from_format(fmt, bias)
    return None


def fuse_projections(model: nn.Module) -> int:
    """Replace q/k/v by `qkv_proj` and gate/up by `gate_up_proj` in every layer where they stack;
    returns how many fused modules were made. The replaced modules are dropped (no extra memory)."""
    made = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _stack_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
            made += 1
        gate_up = _stack_linears([mlp.gate_proj, mlp.up_proj])
        if gate_up is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
            made += 1
    return made
