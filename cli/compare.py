"""`lowbit compare`: what each weight/KV quantization costs in accuracy and buys in bytes and
speed, against the 16-bit model on the same text; quantized here (--weights) or read from lowbit
checkpoints (--checkpoint). Table on stdout, progress on stderr."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import click

from lowbit.cli.options import device_options
from lowbit.cli.report import human_bytes

WEIGHT_SPEC = re.compile(r"int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<sym>-sym)?")
WEIGHT_EXAMPLES = ("16, int8, int8-g128, int4, int4-g64, int4-g32, int4-g128-sym, "
                   "bnb-nf4, bnb-fp4, bnb-int8 (bitsandbytes)")
KV_CHOICES = (16, 8, 4)
DEFAULT_INT4_GROUP = 128
DEFAULT_WEIGHTS = "16,int8,int4"
OVERLAP_MARK = "*"


def split_list(values: tuple[str, ...]) -> list[str]:
    """Repeated options of comma lists → items in order, blanks and repeats dropped."""
    items = [item.strip() for value in values for item in value.split(",")]
    return list(dict.fromkeys(item for item in items if item))


def parse_weights(spec: str, group_size: int | None, keep_16bit: tuple[str, ...] = ()):
    """"16" → None; "int{bits}[-g{N}][-sym]" → QuantConfig. `group_size` (from --group-size)
    applies where the spec names no group: int8 is otherwise per channel, int4 group 128.
    `keep_16bit` patterns add to the default (the embeddings)."""
    from lowbit.quant.config import BNB_METHODS, DEFAULT_KEEP_16BIT, QuantConfig, QuantConfigError

    if spec == "16":
        return None
    if spec in BNB_METHODS:  # bitsandbytes' formats fix their own block size
        from lowbit.quant.bnb import bnb_quant_config
        return bnb_quant_config(spec, keep_16bit=tuple(dict.fromkeys(DEFAULT_KEEP_16BIT
                                                                     + keep_16bit)))
    m = WEIGHT_SPEC.fullmatch(spec)
    if m is None or int(m["bits"]) not in (4, 8):
        raise click.ClickException(f"--weights: unknown spec {spec!r}; use {WEIGHT_EXAMPLES}")
    bits = int(m["bits"])
    group = int(m["group"]) if m["group"] else group_size
    if group is None and bits == 4:
        group = DEFAULT_INT4_GROUP
    try:
        return QuantConfig(weight_bits=bits, group_size=group, symmetric=bool(m["sym"]),
                           keep_16bit=tuple(dict.fromkeys(DEFAULT_KEEP_16BIT + keep_16bit)))
    except QuantConfigError as e:
        raise click.ClickException(f"--weights {spec}: {e}") from None


def parse_kv(spec: str) -> int:
    if spec not in {str(b) for b in KV_CHOICES}:
        raise click.ClickException(f"--kv: unknown KV-cache bits {spec!r}; use 16, 8 or 4")
    return int(spec)


def parse_variants(weights: tuple[str, ...], kv: tuple[str, ...], group_size: int | None,
                   keep_16bit: tuple[str, ...] = (), checkpoints: tuple[str, ...] = ()):
    """Every (weights, KV) pair of the two lists, except the 16/16 reference, then every
    (checkpoint, KV) pair. Checkpoints are validated here (engine.compare.checkpoint_variants
    raises the user errors that name a bad one)."""
    from lowbit.engine.compare import REFERENCE, Variant, checkpoint_variants

    quants = [parse_weights(s, group_size, keep_16bit) for s in split_list(weights)]
    kv_bits = [parse_kv(s) for s in split_list(kv)]
    if not quants or not kv_bits:
        raise click.ClickException("--weights and --kv each need at least one value")
    variants = list(dict.fromkeys(Variant(q, b) for q in quants for b in kv_bits))
    variants = [v for v in variants if v != REFERENCE]
    variants += checkpoint_variants(list(checkpoints), kv_bits)
    if not variants:
        raise click.ClickException("nothing to compare: every variant is the 16-bit reference; "
                                   "add e.g. --weights 16,int8,int4, --kv 16,8,4 or "
                                   "--checkpoint CKPT")
    return variants


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(comparison) -> str:
    """One aligned table, the reference row first; a checkpoint whose calibration may overlap
    the evaluated text is marked, and why is said under the table."""
    headers = ["variant", "ppl", "Δppl %", "KL", "top-1 %", "bits/w", "weights", "KV/token",
               "prefill tok/s", "decode tok/s", "peak mem"]
    lines = []
    for row in [comparison.reference, *comparison.variants]:
        name = row.variant.name + (" (reference)" if row is comparison.reference else "")
        name += f" {OVERLAP_MARK}" if row.calibration_overlap else ""
        lines.append([name, _fmt(row.ppl, ".3f"), _fmt(row.ppl_delta_pct, "+.2f"),
                      _fmt(row.kl_mean, ".3g"), _fmt(row.top1_agreement, ".2f"),
                      _fmt(row.bits_per_weight, ".2f"), human_bytes(row.weight_bytes),
                      human_bytes(row.kv_bytes_per_token), _fmt(row.prefill_tok_s, ".1f"),
                      _fmt(row.decode_tok_s, ".1f"),
                      "n/a" if row.peak_mem_bytes is None else human_bytes(row.peak_mem_bytes)])
    widths = [max(len(r[i]) for r in [headers, *lines]) for i in range(len(headers))]

    def render(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    notes = [f"{OVERLAP_MARK} {row.variant.name}: {row.calibration_overlap}"
             for row in comparison.variants if row.calibration_overlap]
    return "\n".join([render(headers), *map(render, lines), *notes])


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _user_errors() -> tuple[type[BaseException], ...]:
    from lowbit.cli.errors import USER_ERRORS
    from lowbit.engine.evaluate import EvaluationError
    from lowbit.engine.device_limits import DeviceLimitsError
    from lowbit.engine.plot import PlotError, PlotUnavailable
    from lowbit.quant.text import TextError
    return (TextError, EvaluationError, DeviceLimitsError, PlotError, PlotUnavailable,
            *USER_ERRORS)


@click.command()
@click.argument("model", required=False)
@click.option("--weights", "weights", multiple=True, default=None,
              help=f"weight settings quantized here (round to nearest), comma-separated or "
                   f"repeated: {WEIGHT_EXAMPLES} [default: {DEFAULT_WEIGHTS}; with --checkpoint: "
                   f"16]")
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="CKPT",
              help="also compare this lowbit checkpoint (from `lowbit convert`, any --method) "
                   "converted from MODEL; repeatable")
@click.option("--allow-other-source", is_flag=True,
              help="compare checkpoints converted from another model than MODEL (e.g. a copy "
                   "at another path) against MODEL anyway; the architecture must match")
@click.option("--kv", "kv", multiple=True, default=("16",), show_default=True,
              help="KV-cache bits, comma-separated or repeated: 16, 8, 4; they apply to "
                   "checkpoints too (not the KV bits a checkpoint records)")
@click.option("--group-size", type=int, default=None,
              help="group size where a --weights spec names none [int8: per channel; int4: 128]")
@click.option("--keep-16bit", "keep_16bit", multiple=True, metavar="PATTERN",
              help="keep modules matching PATTERN 16-bit in every --weights variant (a prefix "
                   "or glob, e.g. lm_head; repeatable); the embeddings always are")
@click.option("--text", "text_path", default=None, metavar="FILE",
              help="UTF-8 text to evaluate on [default: the ABC news corpus lee_background.cor "
                   "from gensim]")
@click.option("--windows", "n_windows", default=8, show_default=True, type=click.IntRange(1),
              help="consecutive windows from the start of the text")
@click.option("--window-len", default=1024, show_default=True, type=click.IntRange(2),
              help="tokens per window")
@click.option("--gen-tokens", default=32, show_default=True, type=click.IntRange(2),
              help="new tokens of the speed run (greedy, after a 128-token prompt from the text)")
@click.option("--json", "json_path", default=None, metavar="PATH",
              help="also write the results as JSON to PATH")
@click.option("--plot", "plot_path", default=None, metavar="PATH",
              help="also draw a roofline chart and per-variant bars to PATH (.png, .svg or "
                   ".pdf); needs pip install 'lowbit[plot]'")
@device_options
def compare(model, weights, checkpoints, allow_other_source, kv, group_size, keep_16bit,
            text_path, n_windows, window_len, gen_tokens, json_path, plot_path, device, dtype):
    """Compare quantized variants of MODEL with its 16-bit self: perplexity, KL divergence and
    top-1 agreement on the same text windows, bits per weight, bytes, speed and peak memory.

    Variants are every (--weights, --kv) pair but the 16/16 reference, e.g.
    `--weights 16,int8,int4 --kv 16,8` gives 5, then every (--checkpoint, --kv) pair. MODEL is
    an HF directory or a GGUF file [default: the embedded SmolLM2-135M-Instruct, whose 16-bit
    weights are its Q4_1 GGUF dequantized]. A checkpoint must have been converted from MODEL;
    one whose calibration text may overlap the evaluated windows is marked with *.
    """
    from lowbit.engine.compare import compare as run_compare
    from lowbit.engine.device_limits import get_limits
    from lowbit.engine.load import resolve_device
    from lowbit.engine.plot import check_plot_path, plot_comparison, require_matplotlib
    from lowbit.engine.profile import format_phase_table
    from lowbit.quant.text import default_text_path, read_text

    if not weights:
        weights = ("16",) if checkpoints else (DEFAULT_WEIGHTS,)
    if json_path and not Path(json_path).resolve().parent.is_dir():
        raise click.ClickException(f"--json {json_path}: the folder does not exist")
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    try:
        variants = parse_variants(weights, kv, group_size, keep_16bit, checkpoints)
        if plot_path:  # refuse before the long run, not after it
            check_plot_path(Path(plot_path))
            require_matplotlib()
        path = Path(text_path) if text_path else default_text_path()
        text = read_text(path)
        limits = get_limits(resolve_device(device), announce=log)
        result = run_compare(model, text, variants, text_label=str(path), device=device,
                             dtype=dtype, n_windows=n_windows, window_len=window_len,
                             gen_tokens=gen_tokens, log=log, limits=limits,
                             allow_other_source=allow_other_source)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from None
    w = result.windows
    default_note = " (the default model: its 16-bit weights are the Q4_1 GGUF dequantized)" \
        if model is None else ""
    log(f"reference: {result.model}{default_note}, weights as stored in {result.dtype} on "
        f"{result.device}, KV 16-bit · text {path.name}: {len(w)} windows × "
        f"{w.tokens.shape[1]} tokens · speed: {result.prompt_tokens}-token prompt + "
        f"{gen_tokens} new tokens")
    click.echo(format_table(result))
    click.echo(format_phase_table([r.to_dict() for r in [result.reference, *result.variants]]))
    if json_path:
        write_json_atomic(Path(json_path), result.to_dict())
    if plot_path:
        plot_comparison(result.to_dict(), Path(plot_path))
        log(f"wrote {plot_path}")
