"""`lowbit bench [MODEL]`: llama-bench-style pp/tg tokens/s for each weight and KV setting."""
from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import click

from lowbit.cli.options import backend_option, device_options, quant_config_from
from lowbit.engine.model_configs import NAMED_CONFIGS


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _bound(phase: dict) -> str:
    if phase["verdict"] is None:
        return "-"
    return f"{phase['verdict'].removesuffix('-bound')} · {phase['frac_roofline']:.0%} of roof"


def _table(rows: list[dict]) -> str:
    """A markdown table in llama-bench's manner."""
    heads = ["model", "size", "params", "weights", "KV", "device", "test", "t/s", "bound"]
    from lowbit.cli.report import human_bytes
    body = [[r["model"], human_bytes(r["size_bytes"]), f"{r['params'] / 1e9:.2f} B", r["weights"],
             str(r["kv"]), r["device"], r["test"], f"{r['tok_s']:.2f} ± {r['tok_s_std']:.2f}",
             _bound(r["phase"])] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    right = {1, 2, 7}

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + (":" if i in right else "-")
                             for i, w in enumerate(widths)) + " |"
    return "\n".join([line(heads), rule, *(line(b) for b in body)])


def _build(model, random_shape, dev, dtype, quant, seed):
    """(model, config, label): `model` loaded and quantized as `quant` asks, or the named
    shape with random weights drawn (and quantized) on the device."""
    import torch

    from lowbit.engine.load import load_model, resolve_dtype
    if random_shape is not None:
        from lowbit.engine.model_configs import named_config
        from lowbit.engine.random_model import random_model
        name, cfg = named_config(random_shape)
        dt = resolve_dtype(dtype, dev, stored=torch.bfloat16)
        return random_model(cfg, dev, dt, quant, seed=seed), cfg, f"{name} (random weights)"
    loaded = load_model(model, device=str(dev), dtype=dtype, quant=quant)
    return loaded.model, loaded.config, Path(loaded.source).name


def _run_settings(model, random_shape, dev, dtype, settings, configs, tests, repetitions,
                  seed, limits, progress) -> list[dict]:
    """One row per (weights, KV, test); each weight setting's model is built once."""
    import torch

    from lowbit.engine.bench import run_test
    from lowbit.engine.generate import model_weight_bytes
    rows = []
    for weight in dict.fromkeys(w for w, _ in settings):
        quant = configs[weight]
        net, cfg, label = _build(model, random_shape, dev, dtype, quant, seed)
        weights_name = quant.name if quant is not None else "16"
        for kv_bits in (k for w, k in settings if w == weight):
            for kind, n in tests:
                result = run_test(net, kind, n, repetitions, kv_bits, seed, limits, weights_name)
                rows.append({
                    "bench": "llama-bench", "model": label, "random_weights": random_shape is not None,
                    "size_bytes": model_weight_bytes(net), "params": cfg.num_parameters(),
                    "weights": weights_name, "kv": kv_bits, "device": dev.type,
                    "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
                    "test": result.test, "tokens": n, "repetitions": repetitions,
                    "tok_s": result.mean, "tok_s_std": result.std,
                    "samples_s": result.seconds, "phase": result.phase})
                if progress is not None:
                    progress(f"{label} · {weights_name} · KV {kv_bits} · {result.test}: "
                             f"{result.mean:.2f} ± {result.std:.2f} t/s")
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the next setting's model needs the room
    return rows


@click.command()
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--random", "random_shape", default=None, metavar="CONFIG",
              help=f"benchmark a model shape with random weights: a named shape "
                   f"({', '.join(NAMED_CONFIGS)}) or an HF config.json")
@device_options
@click.option("--weights", default="16,int8,int4", show_default=True,
              help="comma-separated weight settings: 16, int8, int4, bnb-nf4, bnb-fp4, "
                   "bnb-int8 (bitsandbytes, run by its own kernels)")
@click.option("--group-size", default=None, type=int, help="int4/int8 group size [int4: 128]")
@click.option("--kv", default="16", show_default=True, help="comma-separated KV-cache bits")
@click.option("--pp", "-p", default=512, show_default=True, type=click.IntRange(0),
              help="prompt tokens of the prompt-processing test (0 skips it)")
@click.option("--tg", "-n", default=128, show_default=True, type=click.IntRange(0),
              help="tokens of the token-generation test (0 skips it)")
@click.option("--repetitions", "-r", default=5, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, help="seed of the random prompt (and weights)")
@backend_option
@click.option("--json", "as_json", is_flag=True,
              help="print one JSON document (card, commit, date, torch, limits, rows)")
def bench(model, random_shape, device, dtype, weights, group_size, kv, pp, tg, repetitions, seed,
          backend, as_json):
    """Prompt processing (ppN) and token generation (tgN) tokens/s, mean ± std over
    --repetitions, for every --weights × --kv setting, each with its roofline verdict.

    MODEL is an HF directory, GGUF file or lowbit checkpoint (default: the embedded model);
    --random CONFIG instead builds the shape with random weights on the device (labelled so)."""
    from lowbit.engine import device_limits
    from lowbit.engine.kernels import registry
    from lowbit.engine.load import resolve_device
    from lowbit.quant.bnb import BnbUnavailable

    if model is not None and random_shape is not None:
        raise click.UsageError("give MODEL or --random CONFIG, not both")
    settings = [(w, int(k)) for w in _split(weights) for k in _split(kv)]
    if not settings:
        raise click.UsageError("--weights and --kv need at least one value each")
    configs = {w: quant_config_from(w, group_size, False, 16) for w in _split(weights)}
    if any(k not in ("16", "8", "4") for k in _split(kv)):
        raise click.BadParameter(f"KV bits must be 16, 8 or 4, not {kv!r}", param_hint="--kv")
    tests = [(kind, n) for kind, n in (("pp", pp), ("tg", tg)) if n > 0]
    if not tests:
        raise click.UsageError("--pp and --tg are both 0: nothing to run")
    dev = resolve_device(device)
    progress = None if as_json else (lambda m: click.echo(m, err=True))
    try:
        with registry.use_backend(backend):
            limits = device_limits.get_limits(dev, announce=lambda m: click.echo(m, err=True))
            rows = _run_settings(model, random_shape, dev, dtype, settings, configs, tests,
                                 repetitions, seed, limits, progress)
    except (device_limits.DeviceLimitsError, BnbUnavailable) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps({
            "card": limits.device, "commit": _commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": limits.torch, "limits": limits.to_dict(),
            "backends": registry.chosen(), "rows": rows}, indent=2))
    else:
        click.echo(_table(rows))
        click.echo(f"roofline: {limits.describe()}")
