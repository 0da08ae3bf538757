"""QuantizedLinear and the module swap that puts it in place of nn.Linear.

The model is built with plain nn.Linear and knows nothing of quantization; `swap_linears` replaces
each linear (except those the config keeps 16-bit) after loading.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lowbit.engine.bnb_linear import BnbLinear
from lowbit.engine.kernels import registry
from lowbit.quant.config import BNB_METHODS, QuantConfig
from lowbit.quant.formats import Int4Weight, Int8Weight
from lowbit.quant.primitives import num_groups
from lowbit.quant.quantize import quantize_weight


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored in an on-disk format (see lowbit.quant.formats).

    Buffers, named as in a checkpoint (`model.layers.0.self_attn.q_proj.qweight`):
      qweight  int4: uint8 (N, K // 2) packed nibbles; int8: int8 (N, K)
      scales   (N, G) in the model's dtype; G = ceil(K / group_size), 1 for per-channel int8
      zeros    uint8 (N, G), int4 asymmetric only
      bias     (N,) in the model's dtype, when the layer has one
    `weight_format` is an Int4Weight/Int8Weight view of these buffers (no copy), rebuilt only when
    a buffer is replaced (`.to(device)`) or written in place (`load_state_dict`, `copy_`), so a
    backend's repacked weight cached on it is reused across calls and never stale.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 symmetric: bool, bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device=None):
        """Allocate empty buffers of the canonical shapes (to be filled from a checkpoint)."""
        super().__init__()
        fmt_cls = {4: Int4Weight, 8: Int8Weight}.get(bits)
        if fmt_cls is None:
            raise ValueError(f"QuantizedLinear holds 4- or 8-bit weights, not {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._format_cls = fmt_cls
        g = 1 if group_size is None else num_groups(in_features, group_size)
        if bits == 4:
            qweight = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        else:
            qweight = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", torch.empty(out_features, g, dtype=dtype, device=device))
        zeros = None
        if bits == 4 and not symmetric:
            zeros = torch.empty(out_features, g, dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)
        b = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        self.register_buffer("bias", b)
        self._format: Int4Weight | Int8Weight | None = None
        self._format_key: tuple | None = None
        # a plain function, not the bound method: a module whose hook holds the module is a
        # reference cycle, freed only by the cycle collector (engine/fuse.py drops ~2.3 GB of
        # Llama-3-8B int4 projections that way, held until a collection ran)
        self.register_load_state_dict_post_hook(_drop_format)

    @classmethod
    def from_format(cls, fmt: Int4Weight | Int8Weight, bias: Tensor | None = None) -> "QuantizedLinear":
        """Wrap an existing format object (its tensors become the buffers, no copy)."""
        m = cls(fmt.in_features, fmt.out_features, fmt.bits, fmt.group_size, fmt.symmetric,
                bias=bias is not None, dtype=fmt.scales.dtype, device="meta")
        for name, t in fmt.tensors().items():
            setattr(m, name, t)
        m.bias = None if bias is None else bias.to(fmt.device)
        m._format, m._format_key = fmt, m._buffers_key()
        if m.scales.is_cuda:
            m._group_major()
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> "QuantizedLinear":
        fmt = quantize_weight(linear.weight.detach(), cfg)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_format(fmt, bias)

    def _buffers_key(self) -> tuple:
        # inference-mode tensors have no version counter; load_state_dict is covered by its hook
        return tuple((id(t), None if t.is_inference() else t._version)
                     for t in (self.qweight, self.scales, self.zeros) if t is not None)

    @property
    def weight_format(self) -> Int4Weight | Int8Weight:
        key = self._buffers_key()
        if self._format is None or self._format_key != key:
            if self.scales.is_cuda:
                self._group_major()
                key = self._buffers_key()
            tensors = {"qweight": self.qweight, "scales": self.scales}
            if self.zeros is not None:
                tensors["zeros"] = self.zeros
            self._format = self._format_cls.from_tensors(tensors, self.group_size,
                                                         self.in_features, self.symmetric)
            self._format_key = key
        return self._format

    def _group_major(self) -> None:
        """Hold scales and zeros (N, G) in group-major storage (strides (1, N)), the layout the
        CUDA kernels read ((G, N) contiguous, one group's N scales side by side): their
        transposes are then views, not a second copy (0.18 GB for Llama-3-8B int4 g128)."""
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if t is not None and t.shape[1] > 1 and t.stride(1) == 1:
                setattr(self, name, t.t().contiguous().t())
                self._format = None  # it holds the old tensors: rebuilt from these on next use

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def forward(self, x: Tensor) -> Tensor:
        return registry.dispatch("dequant_matmul", x, self.weight_format, self.bias)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits}, {g}, {sym}, bias={self.bias is not None}")


def _drop_format(module: QuantizedLinear, _incompatible_keys) -> None:
    """load_state_dict post-hook: the format view is rebuilt from the new buffers on next use."""
    module._format = module._format_key = None


def swap_linears(model: nn.Module, cfg: QuantConfig, *,
                 skip: Callable[[str], bool] | None = None, empty: bool = False) -> dict:
    """Replace every nn.Linear whose name `skip` rejects (default: cfg.keeps_16bit) by a
    QuantizedLinear, in place. lm_head is quantized unless a keep_16bit pattern names it or it is
    a tied one (QuantConfig.stays_16bit).

    empty=True builds uninitialised QuantizedLinear shells of the right shapes instead of
    quantizing (for filling from a lowbit checkpoint; works on a meta-device model).
    Returns {"quantized": count, "kept_16bit": [names], "bytes_before": ..., "bytes_after": ...},
    the bytes counting the swapped layers' weights and biases only.
    """
    if cfg.weight_bits == 16:
        raise ValueError("weight_bits=16: there is nothing to swap")
    if isinstance(model, nn.Linear):
        raise ValueError("swap_linears replaces linears inside a model; wrap a bare nn.Linear "
                         "with QuantizedLinear.from_linear instead")
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    skip = skip or (lambda name: cfg.stays_16bit(name, tied))
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    summary = {"quantized": 0, "kept_16bit": [], "bytes_before": 0, "bytes_after": 0}
    for name, linear in linears:
        if skip(name):
            summary["kept_16bit"].append(name)
            continue
        rules = cfg.for_module(name)  # a keep_8bit module is per-channel int8
        if cfg.method in BNB_METHODS:  # bitsandbytes' formats run in its own modules
            q = (BnbLinear.empty(cfg.method, linear.out_features, linear.in_features,
                                 linear.bias is not None, linear.weight.dtype,
                                 linear.weight.device)
                 if empty else BnbLinear.from_linear(linear, cfg))
        elif empty:
            q = QuantizedLinear(linear.in_features, linear.out_features, rules.weight_bits,
                                rules.group_size, rules.symmetric, bias=linear.bias is not None,
                                dtype=linear.weight.dtype, device=linear.weight.device)
        else:
            q = QuantizedLinear.from_linear(linear, rules)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
        summary["quantized"] += 1
        summary["bytes_before"] += sum(p.numel() * p.element_size() for p in linear.parameters())
        summary["bytes_after"] += q.nbytes
    return summary
