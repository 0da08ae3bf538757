"""Options shared by several commands, so they read and validate the same everywhere."""
from __future__ import annotations

import click

from lowbit.quant.config import BNB_METHODS, QuantConfig

WEIGHT_CHOICES = ("16", "int8", "int4", *BNB_METHODS)


def model_option(f):
    return click.option("--model", "-m", "model", default=None, metavar="PATH",
                        help="HF directory, GGUF file or lowbit checkpoint "
                             "[default: the embedded SmolLM2-135M-Instruct]")(f)


def device_options(f):
    f = click.option("--dtype", default="auto", show_default=True,
                     help="auto (CPU: fp32, bf16 for quantized weights; CUDA: the model's 16-bit dtype), fp32, bf16, fp16")(f)
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when available), cpu, cuda, cuda:N")(f)


def backend_option(f):
    return click.option("--backend", default=None,
                        help="force a kernel backend (reference, cpu-packed, triton); "
                             "it refuses with the reason where it cannot run")(f)


def quant_config_from(weights: str, group_size: int | None, symmetric: bool, kv: int,
                      keep_16bit: tuple[str, ...] = ()) -> QuantConfig | None:
    """--weights/--group-size/--symmetric/--kv → QuantConfig (None for 16-bit weights)."""
    if weights not in WEIGHT_CHOICES:
        raise click.BadParameter(f"unknown weights {weights!r}; choose from {', '.join(WEIGHT_CHOICES)}")
    if weights == "16":
        return None
    kwargs = {"keep_16bit": keep_16bit} if keep_16bit else {}
    if weights in BNB_METHODS:  # bitsandbytes' formats fix their own block size
        from lowbit.quant.bnb import bnb_quant_config
        return bnb_quant_config(weights, kv_bits=kv, **kwargs)
    bits = int(weights[3:])
    if group_size is None and bits == 4:
        group_size = 128
    return QuantConfig(weight_bits=bits, group_size=group_size, symmetric=symmetric,
                       kv_bits=kv, **kwargs)
