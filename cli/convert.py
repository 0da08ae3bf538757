"""`lowbit convert [SRC] OUT`: a 16-bit model → a lowbit checkpoint directory."""
from __future__ import annotations

from pathlib import Path

import click

from lowbit.cli.report import human_bytes

WEIGHT_BITS = {"int8": 8, "int4": 4}


def _quant_config(weights: str, group_size: int | None, symmetric: bool, keep_16bit: tuple,
                  kv: int, method: str, keep_8bit: tuple = (), tied_head: bool = False):
    from lowbit.quant.config import BNB_METHODS, DEFAULT_KEEP_16BIT, QuantConfig

    keep = tuple(dict.fromkeys(DEFAULT_KEEP_16BIT + keep_16bit))
    if weights in BNB_METHODS:  # bitsandbytes' formats fix their own block size and quantizer
        if group_size is not None or symmetric or method != "rtn":
            raise click.ClickException(f"--weights {weights} takes no --group-size, "
                                       f"--symmetric or --method: bitsandbytes fixes them")
        from lowbit.quant.bnb import bnb_quant_config
        return bnb_quant_config(weights, keep_16bit=keep, kv_bits=kv)
    if weights not in WEIGHT_BITS:
        raise click.ClickException(f"unknown --weights {weights!r}; choose int8, int4 or "
                                   f"{', '.join(BNB_METHODS)}")
    bits = WEIGHT_BITS[weights]
    if group_size is None and bits == 4:
        group_size = 128
    return QuantConfig(weight_bits=bits, group_size=group_size, symmetric=symmetric,
                       method=method, keep_16bit=keep, kv_bits=kv, keep_8bit=keep_8bit,
                       quantize_tied_lm_head=tied_head)


def format_summary(s) -> str:
    return "\n".join([
        f"wrote {s.out}  ({s.quant.name}, {s.quant.method}, KV {s.quant.kv_bits}-bit by default)",
        f"  weights      {human_bytes(s.bytes_before)} (16-bit) → {human_bytes(s.bytes_after)}  "
        f"({s.ratio:.2f}x smaller, {s.tensors} tensors)",
        f"  bits/weight  {s.bits_per_weight_linears:.2f} over the quantized linears · "
        f"{s.bits_per_weight_overall:.2f} overall",
        f"  time         {s.seconds:.1f} s · peak RSS {human_bytes(s.peak_rss_bytes)}",
    ])


@click.command()
@click.argument("paths", nargs=-1, metavar="[SRC] OUT")
@click.option("--weights", default="int4", show_default=True,
              help="int8, int4, or bitsandbytes' bnb-nf4, bnb-fp4 (blocks of 64, double "
                   "quantization; -nodq without), bnb-int8 (LLM.int8)")
@click.option("--group-size", type=int, default=None,
              help="input columns per scale: a power of two from 16 to 1024 "
                   "[default: 128 for int4, one scale per output channel for int8]")
@click.option("--symmetric", is_flag=True, help="int4 without zero points (int8 always is)")
@click.option("--keep-16bit", "keep_16bit", multiple=True, metavar="PATTERN",
              help="keep modules matching PATTERN (a prefix or glob, e.g. lm_head or "
                   "'*.down_proj') in 16-bit; repeatable; the embedding always is")
@click.option("--quantize-tied-lm-head", "tied_head", is_flag=True,
              help="also store a quantized copy of a tied embedding as lm_head: less decode "
                   "bandwidth, more memory, and on SmolLM2 int4 +55% perplexity instead of +32%")
@click.option("--kv", type=int, default=16, show_default=True,
              help="default KV-cache bits recorded in the checkpoint (16, 8 or 4)")
@click.option("--method", default="rtn", show_default=True,
              help="rtn (round to nearest, no calibration), search (scales and zero points "
                   "searched against the calibration inputs' importance) or gptq (second-order "
                   "error compensation); search and gptq calibrate on --calib text")
@click.option("--calib", default=None, metavar="FILE",
              help="calibration text, one document a line [default: the news corpus minus "
                   "what `lowbit compare` evaluates on]")
@click.option("--calib-tokens", type=click.IntRange(1), default=None,
              help="calibration tokens [default: 32768]")
@click.option("--keep-8bit", "keep_8bit", multiple=True, metavar="PATTERN",
              help="store modules matching PATTERN as per-channel int8 in an int4 checkpoint "
                   "(see `lowbit sensitivity`); repeatable")
@click.option("--seed", type=int, default=0, show_default=True,
              help="which calibration documents are drawn")
@click.option("--device", default="auto", show_default=True,
              help="where calibration runs: auto, cpu, cuda, cuda:N")
@click.option("--force", is_flag=True, help="replace OUT if it is a lowbit checkpoint")
def convert(paths, weights, group_size, symmetric, keep_16bit, tied_head, kv, method, calib,
            calib_tokens, keep_8bit, seed, device, force):
    """Quantize SRC (an HF directory or GGUF file; default: the embedded SmolLM2-135M-Instruct)
    into a lowbit checkpoint directory OUT, streaming one tensor at a time."""
    from lowbit.quant.architecture import UnsupportedModelError
    from lowbit.quant.checkpoint import CheckpointError
    from lowbit.quant.config import QuantConfigError
    from lowbit.quant.convert import convert as run_convert
    from lowbit.engine.load import LoadError
    from lowbit.engine.tokenizer import TokenizerError
    from lowbit.quant.formats import FormatError
    from lowbit.quant.primitives import QuantizationError
    from lowbit.quant.sources import ModelSourceError
    from lowbit.quant.text import TextError

    if len(paths) not in (1, 2):
        raise click.ClickException(f"expected [SRC] OUT, got {len(paths)} paths")
    src, out = (None, paths[0]) if len(paths) == 1 else paths
    calibrated = method in ("search", "gptq")
    if not calibrated and (calib or calib_tokens):
        raise click.ClickException("--calib and --calib-tokens need --method search or gptq")
    try:
        cfg = _quant_config(weights, group_size, symmetric, keep_16bit, kv, method, keep_8bit,
                            tied_head)
        if calibrated:
            from lowbit.engine.calibrate import CalibrationSettings, convert_calibrated
            summary = convert_calibrated(src, Path(out), cfg, CalibrationSettings(method),
                                         calib=calib, calib_tokens=calib_tokens, seed=seed,
                                         device=device, force=force)
        else:
            summary = run_convert(src, Path(out), cfg, force=force)
    except (QuantConfigError, CheckpointError, ModelSourceError, UnsupportedModelError,
            FormatError, TextError, QuantizationError, LoadError, TokenizerError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(summary))
