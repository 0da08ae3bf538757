"""QuantConfig: what a lowbit checkpoint's weights and KV cache are quantized to.

Serialised to JSON in lowbit.json (and repeated in the safetensors metadata); settings are never
parsed from file or module names.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

WEIGHT_BITS = (16, 8, 4)
KV_BITS = (16, 8, 4)
# bitsandbytes' formats, quantized and run by bitsandbytes itself (lowbit.quant.bnb), for
# side-by-side comparison: method -> (weight bits, block size along the flattened weight)
BNB_METHODS = {"bnb-nf4": (4, 64), "bnb-fp4": (4, 64), "bnb-nf4-nodq": (4, 64),
               "bnb-fp4-nodq": (4, 64), "bnb-int8": (8, None)}
METHODS = ("rtn", "search", "gptq", *BNB_METHODS)
# Embeddings are a gather, not a matmul: quantizing them saves memory but no decode bandwidth
# beyond one row per token, so they stay 16-bit unless the user asks otherwise.
DEFAULT_KEEP_16BIT = ("model.embed_tokens",)


class QuantConfigError(ValueError):
    """A quantization setting that lowbit cannot honour; the message says which and why."""


def check_group_size(group_size: int) -> None:
    if group_size < 16 or group_size > 1024 or group_size & (group_size - 1):
        raise QuantConfigError(
            f"group size {group_size} is not a power of two from 16 to 1024")


def _matches(module_name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern matches a module by name, as a prefix of dotted names, or as an fnmatch glob."""
    import fnmatch
    return any(module_name == p or module_name.startswith(p + ".")
               or fnmatch.fnmatchcase(module_name, p) for p in patterns)


@dataclass(frozen=True)
class QuantConfig:
    """Weight bits (16/8/4), group size along the input dimension (None = one group per output
    channel, int8 only), symmetry, method, module patterns kept 16-bit, and KV-cache bits."""

    weight_bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    method: str = "rtn"
    keep_16bit: tuple[str, ...] = DEFAULT_KEEP_16BIT
    kv_bits: int = 16
    calibration: dict = field(default_factory=dict, compare=False)
    # module patterns stored as per-channel int8 inside an int4 model (the most sensitive layers)
    keep_8bit: tuple[str, ...] = ()
    # A tied lm_head IS the embedding table: quantizing it stores a second, quantized copy (more
    # memory, less decode bandwidth). Off by default: on SmolLM2-135M it alone moved int4 g128 RTN
    # from +32% to +55% perplexity and int8 KL from 0.0031 to 0.0041 (8 x 1024 news windows).
    quantize_tied_lm_head: bool = False

    def __post_init__(self):
        if self.weight_bits not in WEIGHT_BITS:
            raise QuantConfigError(f"weight bits must be one of {WEIGHT_BITS}, not {self.weight_bits}")
        if self.kv_bits not in KV_BITS:
            raise QuantConfigError(f"KV bits must be one of {KV_BITS}, not {self.kv_bits}")
        if self.method not in METHODS:
            raise QuantConfigError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.method in BNB_METHODS and ((self.weight_bits, self.group_size)
                                           != BNB_METHODS[self.method] or self.keep_8bit):
            bits, block = BNB_METHODS[self.method]
            raise QuantConfigError(f"{self.method} means {bits}-bit weights, "
                                   f"{f'blocks of {block}' if block else 'one scale a row'} and "
                                   f"no keep-8-bit layers")
        if self.group_size is None:
            if self.weight_bits == 4:
                raise QuantConfigError("int4 needs a group size (32, 64 or 128 are usual)")
        else:
            check_group_size(self.group_size)
        if self.weight_bits == 8 and not self.symmetric:
            object.__setattr__(self, "symmetric", True)  # int8 is symmetric by definition here
        object.__setattr__(self, "keep_16bit", tuple(self.keep_16bit))
        object.__setattr__(self, "keep_8bit", tuple(self.keep_8bit))
        if self.keep_8bit and self.weight_bits != 4:
            raise QuantConfigError("keeping layers at 8 bits needs int4 weights for the rest")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep_16bit"] = list(self.keep_16bit)
        d["keep_8bit"] = list(self.keep_8bit)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QuantConfigError(f"unknown quantization settings: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def keeps_16bit(self, module_name: str) -> bool:
        """True if `module_name` matches a keep-16-bit pattern: a prefix or an fnmatch glob."""
        return _matches(module_name, self.keep_16bit)

    def stays_16bit(self, module_name: str, tied_embeddings: bool) -> bool:
        """keeps_16bit, and a tied model's lm_head unless quantize_tied_lm_head says otherwise."""
        if module_name == "lm_head" and tied_embeddings and not self.quantize_tied_lm_head:
            return True
        return self.keeps_16bit(module_name)

    def keeps_8bit(self, module_name: str) -> bool:
        """True if `module_name` matches a keep-8-bit pattern (and no keep-16-bit one)."""
        return not self.keeps_16bit(module_name) and _matches(module_name, self.keep_8bit)

    def for_module(self, module_name: str) -> "QuantConfig":
        """The settings `module_name`'s weight is stored with: per-channel int8 when a keep-8-bit
        pattern names it, else this config."""
        if not self.keeps_8bit(module_name):
            return self
        return dataclasses.replace(self, weight_bits=8, group_size=None, symmetric=True,
                                   keep_8bit=())

    @property
    def name(self) -> str:
        if self.weight_bits == 16:
            return "16"
        if self.method in BNB_METHODS:
            return self.method
        g = "pc" if self.group_size is None else f"g{self.group_size}"
        s = "sym" if self.symmetric or self.weight_bits == 8 else "asym"
        return f"int{self.weight_bits}-{g}" + ("" if self.weight_bits == 8 else f"-{s}")
