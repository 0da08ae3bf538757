"""The on-disk weight formats: one flat class per format, tensors plus their exact layout.

These layouts are canonical and device-independent; a kernel backend may repack at load time but
never changes what is stored. Shapes use N = out_features, K = in_features, gs = group_size,
G = ceil(K / gs). Group g covers input columns [g*gs, min((g+1)*gs, K)): when K % gs != 0 the last
group is ragged (K=576, gs=128 -> 5 groups, the last of 64 columns).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import QuantConfigError, check_group_size
from .primitives import (dequantize_affine, num_groups, pack_int4, quantize_affine,
                         unpack_int4)

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT4_SYMMETRIC_ZERO = 8


class FormatError(ValueError):
    """Tensors that do not match a weight format; the message names the tensor and what is wrong."""


def _check_group_size(group_size: int) -> None:
    try:
        check_group_size(group_size)
    except QuantConfigError as e:
        raise FormatError(str(e)) from None


def _scale_dtype(w: Tensor, scale_dtype: torch.dtype | None) -> torch.dtype:
    dtype = scale_dtype or w.dtype
    if dtype not in SCALE_DTYPES:
        raise FormatError(f"scales must be fp16, bf16 or fp32, not {dtype}")
    return dtype


def _expect(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]):
    if not isinstance(t, Tensor):
        raise FormatError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise FormatError(f"{name}: dtype {str(t.dtype).removeprefix('torch.')}, expected {want}")
    if tuple(t.shape) != shape:
        raise FormatError(f"{name}: shape {tuple(t.shape)}, expected {shape}")


def _expect_names(tensors: dict, required: set[str], optional: set[str] = frozenset()):
    missing = required - set(tensors)
    if missing:
        raise FormatError(f"missing tensor(s): {sorted(missing)}")
    extra = set(tensors) - required - optional
    if extra:
        raise FormatError(f"unexpected tensor(s): {sorted(extra)}")
    devices = {t.device for t in tensors.values() if isinstance(t, Tensor)}
    if len(devices) > 1:
        raise FormatError(f"tensors are on different devices: {sorted(map(str, devices))}")


class _WeightFormat:
    """Shared bookkeeping; each subclass defines bits, tensors() and from_tensors()."""

    bits: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.out_features * self.in_features)

    @property
    def repacked(self) -> dict:
        """Backend-owned copies of these tensors in a kernel's layout, built once and reused;
        keyed by the backend. Never saved; dropped with this object (so `to()` starts empty)."""
        return self.__dict__.setdefault("_repacked", {})

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def to(self, device) -> "_WeightFormat":
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return type(self).from_tensors(moved, self.group_size, self.in_features, self.symmetric)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(out_features={self.out_features}, in_features="
                f"{self.in_features}, group_size={self.group_size}, symmetric={self.symmetric}, "
                f"scales={str(self.scale_dtype).removeprefix('torch.')})")


class Int4Weight(_WeightFormat):
    """int4 weights, two unsigned nibbles per byte, packed along the input dimension.

    qweight  uint8 (N, K // 2): byte[n, j] = u[n, 2j] | (u[n, 2j + 1] << 4), u in [0, 15]
             (the even input index in the low nibble). K must be even.
    scales   (N, G) in the model's 16-bit dtype (fp32 when the model is fp32).
    zeros    uint8 (N, G), integer zero points in [0, 15]; present only when asymmetric.
             Symmetric means z = 8 for every group and no zeros tensor.
    Dequantization, every variant: w[n, k] = (u[n, k] - z[n, k // gs]) * s[n, k // gs].
    Groups run along K in blocks of gs; the last group is ragged when K % gs != 0.
    """

    bits = 4

    def __init__(self, qweight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                 in_features: int, symmetric: bool):
        self.qweight = qweight
        self.scales = scales
        self.zeros = zeros
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = qweight.shape[0]
        self.symmetric = symmetric

    @classmethod
    def quantize(cls, w: Tensor, group_size: int, symmetric: bool = False,
                 scale_dtype: torch.dtype | None = None) -> "Int4Weight":
        """Round-to-nearest int4 of w (N, K); scales default to w's dtype."""
        _check_group_size(group_size)
        if w.dim() == 2 and w.shape[1] % 2:
            raise FormatError(f"int4 needs an even number of input features, got {w.shape[1]}")
        q, scale, zero = quantize_affine(w, 4, group_size, symmetric, _scale_dtype(w, scale_dtype))
        if symmetric:
            q = (q.to(torch.int16) + INT4_SYMMETRIC_ZERO).to(torch.uint8)  # [-8, 7] -> [0, 15]
        return cls(pack_int4(q), scale, zero, group_size, w.shape[1], symmetric)

    def unpacked(self) -> Tensor:
        """(N, K) uint8 nibbles u in [0, 15]."""
        return unpack_int4(self.qweight)

    def zero_points(self) -> Tensor:
        """(N, G) uint8 zero points, the implicit 8s included when symmetric."""
        if self.zeros is not None:
            return self.zeros
        return torch.full_like(self.scales, INT4_SYMMETRIC_ZERO, dtype=torch.uint8)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """(N, K) weight in `dtype` (default: the scales' dtype)."""
        return dequantize_affine(self.unpacked(), self.scales, self.zero_points(),
                                 self.group_size, dtype)

    def tensors(self) -> dict[str, Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(cls, tensors: dict, group_size: int, in_features: int,
                     symmetric: bool) -> "Int4Weight":
        """Validate names, dtypes and shapes (raising FormatError) and wrap without copying."""
        _check_group_size(group_size)
        if in_features < 2 or in_features % 2:
            raise FormatError(f"int4 needs an even number of input features, got {in_features}")
        _expect_names(tensors, {"qweight", "scales"} if symmetric else {"qweight", "scales", "zeros"})
        qweight, scales = tensors["qweight"], tensors["scales"]
        if not isinstance(qweight, Tensor) or qweight.dim() != 2:
            raise FormatError(f"qweight: expected a 2-D tensor, got "
                              f"{getattr(qweight, 'shape', type(qweight).__name__)}")
        n, g = qweight.shape[0], num_groups(in_features, group_size)
        _expect("qweight", qweight, (torch.uint8,), (n, in_features // 2))
        _expect("scales", scales, SCALE_DTYPES, (n, g))
        zeros = None
        if not symmetric:
            zeros = tensors["zeros"]
            _expect("zeros", zeros, (torch.uint8,), (n, g))
            if zeros.numel() and int(zeros.max()) > 15:
                raise FormatError(f"zeros: value {int(zeros.max())} outside the int4 range [0, 15]")
        return cls(qweight, scales, zeros, group_size, in_features, symmetric)


class Int8Weight(_WeightFormat):
    """Symmetric int8 weights with per-output-channel or per-group scales.

    qweight  int8 (N, K), q in [-127, 127].
    scales   (N, G) in the model's 16-bit dtype (fp32 when the model is fp32); G = 1 when
             per-channel (group_size None), else ceil(K / gs) with a ragged last group when
             K % gs != 0.
    Dequantization: w[n, k] = q[n, k] * s[n, k // gs] (gs = K when per-channel).
    """

    bits = 8
    symmetric = True

    def __init__(self, qweight: Tensor, scales: Tensor, group_size: int | None):
        self.qweight = qweight
        self.scales = scales
        self.zeros = None
        self.group_size = group_size
        self.out_features, self.in_features = qweight.shape

    @property
    def block_size(self) -> int:
        """Columns per scale: group_size, or K when per-channel."""
        return self.group_size or self.in_features

    @classmethod
    def quantize(cls, w: Tensor, group_size: int | None = None, symmetric: bool = True,
                 scale_dtype: torch.dtype | None = None) -> "Int8Weight":
        """Round-to-nearest int8 of w (N, K), s = absmax / 127 per channel or group."""
        if not symmetric:
            raise FormatError("int8 weights are symmetric only")
        if group_size is not None:
            _check_group_size(group_size)
        block = group_size or w.shape[-1]
        q, scale, _ = quantize_affine(w, 8, block, True, _scale_dtype(w, scale_dtype))
        return cls(q, scale, group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """(N, K) weight in `dtype` (default: the scales' dtype)."""
        return dequantize_affine(self.qweight, self.scales, None, self.block_size, dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    @classmethod
    def from_tensors(cls, tensors: dict, group_size: int | None, in_features: int,
                     symmetric: bool = True) -> "Int8Weight":
        """Validate names, dtypes and shapes (raising FormatError) and wrap without copying."""
        if not symmetric:
            raise FormatError("int8 weights are symmetric only")
        if group_size is not None:
            _check_group_size(group_size)
        _expect_names(tensors, {"qweight", "scales"})
        qweight, scales = tensors["qweight"], tensors["scales"]
        if not isinstance(qweight, Tensor) or qweight.dim() != 2:
            raise FormatError(f"qweight: expected a 2-D tensor, got "
                              f"{getattr(qweight, 'shape', type(qweight).__name__)}")
        n = qweight.shape[0]
        g = 1 if group_size is None else num_groups(in_features, group_size)
        _expect("qweight", qweight, (torch.int8,), (n, in_features))
        _expect("scales", scales, SCALE_DTYPES, (n, g))
        return cls(qweight, scales, group_size)


WeightFormat = Int4Weight | Int8Weight
