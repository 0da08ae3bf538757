"""bitsandbytes weight formats, stored as plain tensors: NF4 / FP4 (QLoRA) and LLM.int8.

lowbit compares itself against bitsandbytes at the same bits, so these keep bitsandbytes' own
layout and quantizer bit for bit (quantized by bitsandbytes.functional, on the weight's device);
only the container differs: every piece of the quant state is a named tensor that safetensors
can hold, where bitsandbytes' own state dict packs the non-tensor fields into a JSON blob
tensor. Nothing is pickled. `quant_state()` rebuilds bitsandbytes' QuantState from the tensors.

Shapes use N = out_features, K = in_features, n = N·K, B = ceil(n / 64) blocks.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import BNB_METHODS as CONFIG_BNB_METHODS
from .config import QuantConfig
from .formats import FormatError

BLOCKSIZE = 64          # QLoRA's block of consecutive weights sharing one absmax
NESTED_BLOCKSIZE = 256  # double quantization: blocks of absmaxes sharing one fp32 absmax
INT8_THRESHOLD = 6.0    # LLM.int8: input columns with any |x| above this stay 16-bit
QUANT_TYPES = ("nf4", "fp4")
INSTALL_HINT = "pip install bitsandbytes (or pip install 'lowbit[gpu]')"

# method name (QuantConfig.method / --weights) -> (quant type, double quantization)
BNB4_METHODS = {"bnb-nf4": ("nf4", True), "bnb-fp4": ("fp4", True),
                "bnb-nf4-nodq": ("nf4", False), "bnb-fp4-nodq": ("fp4", False)}
BNB8_METHODS = ("bnb-int8",)
BNB_METHODS = (*BNB4_METHODS, *BNB8_METHODS)


class BnbUnavailable(RuntimeError):
    """bitsandbytes is needed for a bnb-* format and is not importable; the message says how
    to get it."""


def bitsandbytes():
    """The bitsandbytes module, or BnbUnavailable naming the install command."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise BnbUnavailable(f"the bnb-* formats need bitsandbytes, which cannot be imported "
                             f"({e}): {INSTALL_HINT}") from None
    return bnb


def _expect(name: str, t, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise FormatError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise FormatError(f"{name}: dtype {str(t.dtype).removeprefix('torch.')}, expected "
                          f"{str(dtype).removeprefix('torch.')}")
    if tuple(t.shape) != shape:
        raise FormatError(f"{name}: shape {tuple(t.shape)}, expected {shape}")


def _expect_names(tensors: dict, names: set[str]) -> None:
    if set(tensors) != names:
        missing, extra = names - set(tensors), set(tensors) - names
        raise FormatError(f"bitsandbytes tensors: missing {sorted(missing)}, unexpected "
                          f"{sorted(extra)}")


class Bnb4bitWeight:
    """bitsandbytes 4-bit weights (NF4 or FP4), blocks of 64, optionally double-quantized.

    qweight           uint8 (ceil(n / 2), 1): the row-major (N, K) weight flattened, one 4-bit
                      code per element, two per byte, the EVEN flat index in the HIGH nibble
                      (bitsandbytes' order; lowbit's int4 puts it in the low nibble).
    quant_map         fp32 (16,): the code book (the NF4 or FP4 values in [-1, 1]).
    absmax            without double quantization: fp32 (B,), the absmax of each block of 64
                      consecutive flat elements. With it: uint8 (B,), codes into
                      nested_quant_map of (block absmax - nested_offset), and
    nested_absmax     fp32 (ceil(B / 256),): the scale of each run of 256 block absmaxes;
    nested_quant_map  fp32 (256,): bitsandbytes' dynamic 8-bit code book;
    nested_offset     fp32 (1,): the mean block absmax, subtracted before quantizing them.
    Dequantization: a[b] = nested_quant_map[absmax[b]] · nested_absmax[b // 256] + offset
    (a[b] = absmax[b] without double quantization); w_flat[i] = quant_map[code_i] · a[i // 64].
    """

    bits = 4

    def __init__(self, tensors: dict[str, Tensor], quant_type: str, out_features: int,
                 in_features: int, dtype: torch.dtype):
        self.qweight = tensors["qweight"]
        self.absmax = tensors["absmax"]
        self.quant_map = tensors["quant_map"]
        self.nested = {k: tensors[k] for k in ("nested_absmax", "nested_quant_map",
                                                 "nested_offset") if k in tensors}
        self.quant_type = quant_type
        self.out_features, self.in_features = out_features, in_features
        self.dtype = dtype  # what dequantize() and bitsandbytes' matmul return
        self.group_size = BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return bool(self.nested)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @staticmethod
    def expected(out_features: int, in_features: int, double_quant: bool) -> dict:
        """name → (dtype, shape) of every tensor of an (out_features × in_features) weight."""
        n = out_features * in_features
        blocks = math.ceil(n / BLOCKSIZE)
        shapes = {"qweight": (torch.uint8, (math.ceil(n / 2), 1)),
                  "quant_map": (torch.float32, (16,))}
        if double_quant:
            shapes["absmax"] = (torch.uint8, (blocks,))
            shapes["nested_absmax"] = (torch.float32, (math.ceil(blocks / NESTED_BLOCKSIZE),))
            shapes["nested_quant_map"] = (torch.float32, (256,))
            shapes["nested_offset"] = (torch.float32, (1,))
        else:
            shapes["absmax"] = (torch.float32, (blocks,))
        return shapes

    @classmethod
    def quantize(cls, w: Tensor, quant_type: str = "nf4",
                 double_quant: bool = True) -> "Bnb4bitWeight":
        """bitsandbytes.functional.quantize_4bit of w (N, K) on w's device, as Params4bit does."""
        if quant_type not in QUANT_TYPES:
            raise FormatError(f"bitsandbytes 4-bit type must be nf4 or fp4, not {quant_type!r}")
        if w.dim() != 2:
            raise FormatError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
        functional = bitsandbytes().functional
        packed, state = functional.quantize_4bit(
            w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant,
            quant_type=quant_type, quant_storage=torch.uint8)
        tensors = {"qweight": packed, "absmax": state.absmax, "quant_map": state.code.float()}
        if double_quant:
            tensors["nested_absmax"] = state.state2.absmax
            tensors["nested_quant_map"] = state.state2.code.float()
            tensors["nested_offset"] = state.offset.float().reshape(1)
        return cls(tensors, quant_type, w.shape[0], w.shape[1], w.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "absmax": self.absmax, "quant_map": self.quant_map,
                **self.nested}

    @classmethod
    def from_tensors(cls, tensors: dict, quant_type: str, out_features: int, in_features: int,
                     dtype: torch.dtype, double_quant: bool) -> "Bnb4bitWeight":
        """Validate names, dtypes and shapes (raising FormatError) and wrap without copying."""
        if quant_type not in QUANT_TYPES:
            raise FormatError(f"bitsandbytes 4-bit type must be nf4 or fp4, not {quant_type!r}")
        expected = cls.expected(out_features, in_features, double_quant)
        _expect_names(tensors, set(expected))
        for name, (dt, shape) in expected.items():
            _expect(name, tensors[name], dt, shape)
        return cls(dict(tensors), quant_type, out_features, in_features, dtype)

    def quant_state(self):
        """bitsandbytes' QuantState for these tensors (views, no copies)."""
        functional = bitsandbytes().functional
        nested = None
        offset = None
        if self.double_quant:
            nested = functional.QuantState(
                absmax=self.nested["nested_absmax"], code=self.nested["nested_quant_map"],
                blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            offset = self.nested["nested_offset"].reshape(())
        return functional.QuantState(
            absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
            code=self.quant_map, blocksize=BLOCKSIZE, quant_type=self.quant_type,
            dtype=self.dtype, offset=offset, state2=nested)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """(N, K) weight, by bitsandbytes' own dequantize_4bit."""
        w = bitsandbytes().functional.dequantize_4bit(self.qweight, self.quant_state())
        return w if dtype is None else w.to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "Bnb4bitWeight":
        return type(self)({k: v.to(device) for k, v in self.tensors().items()},
                          self.quant_type, self.out_features, self.in_features, self.dtype)

    def __repr__(self) -> str:
        return (f"Bnb4bitWeight({self.quant_type}, out_features={self.out_features}, "
                f"in_features={self.in_features}, double_quant={self.double_quant})")


class BnbInt8Weight:
    """LLM.int8 weights in bitsandbytes' layout (what Int8Params holds after quantizing).

    qweight  int8 (N, K): round(127 · w / SCB[n]), the weight cast to fp16 first (as
             bitsandbytes does).
    scb      fp32 (N,): SCB, the absmax of each output row.
    Dequantization: w[n, k] = qweight[n, k] · scb[n] / 127. At run time LLM.int8 computes the
    input columns holding any |x| > 6.0 in 16-bit against the dequantized weight columns
    (mixed-precision decomposition) and the rest in int8.
    """

    bits = 8
    group_size = None
    threshold = INT8_THRESHOLD

    def __init__(self, qweight: Tensor, scb: Tensor, dtype: torch.dtype):
        self.qweight, self.scb = qweight, scb
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @staticmethod
    def expected(out_features: int, in_features: int) -> dict:
        return {"qweight": (torch.int8, (out_features, in_features)),
                "scb": (torch.float32, (out_features,))}

    @classmethod
    def quantize(cls, w: Tensor) -> "BnbInt8Weight":
        """bitsandbytes.functional.int8_vectorwise_quant of w (N, K) in fp16, on w's device."""
        if w.dim() != 2:
            raise FormatError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
        functional = bitsandbytes().functional
        cb, scb, _ = functional.int8_vectorwise_quant(w.contiguous().to(torch.float16))
        return cls(cb, scb, w.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "scb": self.scb}

    @classmethod
    def from_tensors(cls, tensors: dict, out_features: int, in_features: int,
                     dtype: torch.dtype) -> "BnbInt8Weight":
        expected = cls.expected(out_features, in_features)
        _expect_names(tensors, set(expected))
        for name, (dt, shape) in expected.items():
            _expect(name, tensors[name], dt, shape)
        return cls(tensors["qweight"], tensors["scb"], dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        w = self.qweight.float() * (self.scb[:, None] / 127.0)
        return w.to(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scb.nbytes

    def to(self, device) -> "BnbInt8Weight":
        return type(self)(self.qweight.to(device), self.scb.to(device), self.dtype)

    def __repr__(self) -> str:
        return (f"BnbInt8Weight(out_features={self.out_features}, "
                f"in_features={self.in_features}, threshold={self.threshold})")


BnbWeight = Bnb4bitWeight | BnbInt8Weight


def quantize_bnb(w: Tensor, method: str) -> BnbWeight:
    """w (N, K) → the bitsandbytes format `method` names (see BNB_METHODS)."""
    if method in BNB4_METHODS:
        quant_type, double_quant = BNB4_METHODS[method]
        return Bnb4bitWeight.quantize(w, quant_type, double_quant)
    if method in BNB8_METHODS:
        return BnbInt8Weight.quantize(w)
    raise FormatError(f"unknown bitsandbytes method {method!r}; known: {', '.join(BNB_METHODS)}")


def expected_bnb_tensors(method: str, out_features: int, in_features: int) -> dict:
    """name → (dtype, shape) of the tensors `method` stores for one linear weight."""
    if method in BNB4_METHODS:
        return Bnb4bitWeight.expected(out_features, in_features, BNB4_METHODS[method][1])
    if method in BNB8_METHODS:
        return BnbInt8Weight.expected(out_features, in_features)
    raise FormatError(f"unknown bitsandbytes method {method!r}; known: {', '.join(BNB_METHODS)}")


def bnb_from_tensors(method: str, tensors: dict, out_features: int, in_features: int,
                     dtype: torch.dtype) -> BnbWeight:
    """Validate and wrap the stored tensors of one linear weight."""
    if method in BNB4_METHODS:
        quant_type, double_quant = BNB4_METHODS[method]
        return Bnb4bitWeight.from_tensors(tensors, quant_type, out_features, in_features, dtype,
                                          double_quant)
    if method in BNB8_METHODS:
        return BnbInt8Weight.from_tensors(tensors, out_features, in_features, dtype)
    raise FormatError(f"unknown bitsandbytes method {method!r}; known: {', '.join(BNB_METHODS)}")


def bnb_quant_config(method: str, **settings) -> QuantConfig:
    """The QuantConfig of a bnb-* method (its bits and block size fixed), plus `settings`
    (kv_bits, keep_16bit)."""
    if method not in CONFIG_BNB_METHODS:
        raise FormatError(f"unknown bitsandbytes method {method!r}; known: "
                          f"{', '.join(BNB_METHODS)}")
    bits, block = CONFIG_BNB_METHODS[method]
    return QuantConfig(weight_bits=bits, group_size=block, method=method, **settings)
