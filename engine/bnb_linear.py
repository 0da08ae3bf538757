"""Linear layers that run bitsandbytes formats through bitsandbytes' own modules.

The stored tensors (lowbit.quant.bnb) are this module's buffers, named as in a checkpoint
(`...q_proj.qweight`, `...q_proj.absmax`, ...). The forward pass is bitsandbytes' own
Linear4bit / Linear8bitLt forward, built once per device around views of those buffers, so the
comparison measures bitsandbytes exactly as its users run it, kernel choices included:

- CUDA: matmul_4bit (a fused GEMV at batch 1, dequantize + cuBLAS above) and LLM.int8's int8
  matmul with the outlier decomposition at threshold 6.0.
- CPU, bitsandbytes 0.50: Linear8bitLt works everywhere (inputs are cast to fp16 for the int8
  quantization). Linear4bit in eval mode on a CPU with AVX512-BF16 repacks the weight once into
  its own bf16-absmax layout (a second copy of the layer, ~1.03× its size) and runs its bf16
  GEMM; that repack needs in_features % 64 == 0 and out_features % 32 == 0, so other shapes
  raise BackendUnavailable here rather than fail inside bitsandbytes or run another path.
  The repack happens in the first forward: ~0.1-0.2 s a layer measured on 2 busy EPYC cores,
  so the default model's first prefill takes tens of seconds; warm-ups absorb it.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lowbit.engine.kernels.registry import BackendUnavailable
from lowbit.quant.bnb import Bnb4bitWeight, BnbInt8Weight, BnbWeight, bitsandbytes

CPU_REPACK_BLOCK_N = 32  # bitsandbytes' CPU 4-bit layout packs 32 output rows together


class _DropInt8CastNotice(logging.Filter):
    """LLM.int8 always quantizes its input from fp16 and logs so at WARNING on every call whose
    input is fp32 or bf16 (thousands of lines a generation); the module docstring says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast from")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropInt8CastNotice())


def _check_cpu_4bit(fmt: Bnb4bitWeight, x: Tensor) -> None:
    bnb = bitsandbytes()
    if x.device.type != "cpu" or not bnb.functional.has_avx512bf16():
        return
    n, k = fmt.out_features, fmt.in_features
    if k % fmt.group_size or n % CPU_REPACK_BLOCK_N:
        raise BackendUnavailable(
            f"bitsandbytes {bnb.__version__} cannot run a {n}×{k} 4-bit layer on this CPU: its "
            f"AVX512-BF16 kernel needs in_features % {fmt.group_size} == 0 and out_features % "
            f"{CPU_REPACK_BLOCK_N} == 0; run it on CUDA or use lowbit's int4")


class BnbLinear(nn.Module):
    """y = x @ W.T + b with W in a bitsandbytes format; see the module docstring."""

    def __init__(self, fmt: BnbWeight, bias: Tensor | None = None):
        super().__init__()
        # Generation reads this before capturing a decode step in a CUDA graph
        self.cuda_graph_unsafe = (
            "LLM.int8 finds its outlier columns with a host sync (torch.argwhere)"
            if isinstance(fmt, BnbInt8Weight) else None)
        self.in_features, self.out_features = fmt.in_features, fmt.out_features
        self._fmt_type = type(fmt)
        self._fmt_args = ((fmt.quant_type, fmt.out_features, fmt.in_features, fmt.dtype,
                           fmt.double_quant) if isinstance(fmt, Bnb4bitWeight)
                          else (fmt.out_features, fmt.in_features, fmt.dtype))
        self._names = tuple(fmt.tensors())
        for name, t in fmt.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.to(fmt.device))
        self._runtime: tuple | None = None  # (key, bitsandbytes module); not a submodule
        self.register_load_state_dict_post_hook(lambda *_: self._drop_runtime())

    @property
    def weight_format(self) -> BnbWeight:
        tensors = {name: getattr(self, name) for name in self._names}
        return self._fmt_type.from_tensors(tensors, *self._fmt_args)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def _drop_runtime(self) -> None:
        self._runtime = None

    def _build_runtime(self, x: Tensor) -> nn.Module:
        bnb = bitsandbytes()
        fmt = self.weight_format
        has_bias = self.bias is not None
        if isinstance(fmt, Bnb4bitWeight):
            _check_cpu_4bit(fmt, x)
            module = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=has_bias,
                                       compute_dtype=x.dtype, compress_statistics=fmt.double_quant,
                                       quant_type=fmt.quant_type, device="meta")
            module.weight = bnb.nn.Params4bit(
                fmt.qweight, requires_grad=False, quant_state=fmt.quant_state(),
                blocksize=fmt.group_size, compress_statistics=fmt.double_quant,
                quant_type=fmt.quant_type, module=module, bnb_quantized=True)
        else:
            module = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=has_bias,
                                         has_fp16_weights=False, threshold=fmt.threshold,
                                         device="meta")
            module.weight = bnb.nn.Int8Params(fmt.qweight, requires_grad=False,
                                              has_fp16_weights=False, CB=fmt.qweight,
                                              SCB=fmt.scb)
        if has_bias:
            module.bias = nn.Parameter(self.bias.to(x.dtype), requires_grad=False)
        return module.eval()

    def forward(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype, *(id(t) for t in self.buffers()))
        if self._runtime is None or self._runtime[0] != key:
            self._runtime = (key, self._build_runtime(x))
        return self._runtime[1](x)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg) -> "BnbLinear":
        """`linear` quantized by bitsandbytes as the bnb-* method cfg.method names."""
        from lowbit.quant.bnb import quantize_bnb
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantize_bnb(linear.weight.detach(), cfg.method), bias)

    @classmethod
    def empty(cls, method: str, out_features: int, in_features: int, bias: bool,
              dtype: torch.dtype, device) -> "BnbLinear":
        """Uninitialised buffers of the shapes `method` stores (to be filled from a checkpoint)."""
        from lowbit.quant.bnb import bnb_from_tensors, expected_bnb_tensors
        tensors = {name: torch.empty(shape, dtype=dt, device=device) for name, (dt, shape)
                   in expected_bnb_tensors(method, out_features, in_features).items()}
        fmt = bnb_from_tensors(method, tensors, out_features, in_features, dtype)
        b = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        return cls(fmt, b)

    def extra_repr(self) -> str:
        if self._fmt_type is Bnb4bitWeight:
            kind = f"bnb {self._fmt_args[0]}, double_quant={self._fmt_args[4]}"
        else:
            kind = f"LLM.int8, threshold={BnbInt8Weight.threshold}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"bias={self.bias is not None}")
