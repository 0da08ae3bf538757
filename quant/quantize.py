"""Quantize one weight matrix as a QuantConfig asks: the entry point every converter calls.

Methods are looked up in `METHODS` (name -> function(w, cfg) -> format); "search" and "gptq"
are added there by the calibration module when it lands.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from .bnb import BnbWeight, quantize_bnb
from .config import BNB_METHODS, QuantConfig, QuantConfigError
from .formats import Int4Weight, Int8Weight


def rtn(w: Tensor, cfg: QuantConfig) -> Int4Weight | Int8Weight:
    """Round-to-nearest with the config's bits, group size and symmetry; scales in w's dtype."""
    if cfg.weight_bits == 4:
        return Int4Weight.quantize(w, cfg.group_size, symmetric=cfg.symmetric)
    return Int8Weight.quantize(w, cfg.group_size)


def bnb(w: Tensor, cfg: QuantConfig) -> BnbWeight:
    """bitsandbytes' own quantizer for the bnb-* method `cfg` names (see quant/bnb.py)."""
    return quantize_bnb(w, cfg.method)


METHODS: dict[str, Callable[[Tensor, QuantConfig], Int4Weight | Int8Weight | BnbWeight]] = {
    "rtn": rtn, **{name: bnb for name in BNB_METHODS}}


def quantize_weight(w: Tensor, cfg: QuantConfig) -> Int4Weight | Int8Weight:
    """(N, K) floating-point weight -> the format `cfg` names (int4 or int8)."""
    if cfg.weight_bits == 16:
        raise QuantConfigError("weight_bits=16 keeps weights unquantized; nothing to quantize")
    method = METHODS.get(cfg.method)
    if method is None:
        raise QuantConfigError(f"quantization method {cfg.method!r} is not implemented in this "
                               f"build (available: {', '.join(sorted(METHODS))})")
    return method(w, cfg)
