"""`lowbit sensitivity [MODEL]`: which linears hurt most when quantized, and what keeping them at
int8 (`lowbit convert --keep-8bit PATTERN`) buys in KL per bit."""
from __future__ import annotations

import json

import click

from lowbit.cli.options import device_options


def format_report(report, top: int) -> str:
    lines = [f"{'rank':>4}  {'unit (--keep-8bit pattern)':<34} {'KL alone':>9} "
             f"{'rel. out err':>12} {'bits':>5}"]
    for i, s in enumerate(report.layers[:top], start=1):
        lines.append(f"{i:>4}  {s.name:<34} {s.kl:9.5f} {s.rel_error:12.5f} {s.bits:5.2f}")
    lines.append("")
    lines.append(f"all linears quantized: KL {report.kl_all:.4f} over {report.tokens} positions")
    lines.append(f"{'keep int8':>9}  {'bits/weight':>11}  {'KL (estimate)':>13}")
    for row in report.trade_off():
        lines.append(f"{row['keep_8bit']:>9}  {row['bits_per_weight']:11.3f}  "
                     f"{row['kl_estimate']:13.4f}")
    worst = [s.name for s in report.layers[:4]]
    if worst:
        flags = " ".join(f"--keep-8bit {n}" for n in worst)
        lines.append(f"\nkeep the 4 most sensitive at int8:  lowbit convert ... {flags}")
    return "\n".join(lines)


@click.command()
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--checkpoint", default=None, metavar="CKPT",
              help="take each linear's quantized weight from this lowbit checkpoint (and the "
                   "model from its recorded source) instead of quantizing here")
@click.option("--method", type=click.Choice(["rtn", "search", "gptq"]), default="rtn",
              show_default=True, help="how each linear is quantized for the measurement")
@click.option("--group-size", type=int, default=128, show_default=True)
@click.option("--symmetric", is_flag=True, help="int4 without zero points")
@click.option("--calib", default=None, metavar="FILE",
              help="calibration text (search/gptq) and the source of the measurement windows "
                   "[default: the news corpus minus compare's evaluation windows]")
@click.option("--calib-tokens", type=int, default=None,
              help="calibration tokens for search/gptq [default: 32768]")
@click.option("--windows", "n_windows", type=click.IntRange(1), default=2, show_default=True,
              help="measurement windows (drawn from the calibration text, never evaluation's)")
@click.option("--window-len", type=click.IntRange(2), default=512, show_default=True)
@click.option("--granularity", type=click.Choice(["linear", "layer", "type"]), default="linear",
              show_default=True, help="measure each linear, each decoder layer (model.layers.N.*) "
                                      "or each projection across layers (*.mlp.down_proj)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--top", type=click.IntRange(1), default=20, show_default=True,
              help="rows of the table")
@click.option("--json", "json_path", default=None, metavar="PATH", help="also write all rows")
@device_options
def sensitivity(model, checkpoint, method, group_size, symmetric, calib, calib_tokens,
                n_windows, window_len, granularity, seed, top, json_path, device, dtype):
    """Measure, for each linear of MODEL (an HF directory or GGUF; default: the embedded
    SmolLM2-135M-Instruct), the KL of the model's next-token distribution when only that linear
    is quantized to int4, and the bits/KL trade-off of keeping the worst at int8."""
    from lowbit.cli.errors import USER_ERRORS
    from lowbit.engine.sensitivity import measure
    from lowbit.quant.config import QuantConfig
    from lowbit.quant.primitives import QuantizationError
    from lowbit.quant.text import TextError

    try:
        quant = QuantConfig(weight_bits=4, group_size=group_size, symmetric=symmetric)
        report = measure(model, quant, method, calib=calib, calib_tokens=calib_tokens,
                         n_windows=n_windows, window_len=window_len, seed=seed, device=device,
                         dtype=dtype, checkpoint=checkpoint, granularity=granularity)
    except (*USER_ERRORS, TextError, QuantizationError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_report(report, top))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"kl_all": report.kl_all, "tokens": report.tokens,
                       "layers": [vars(s) for s in report.layers],
                       "trade_off": report.trade_off()}, f, indent=1)
