"""`lowbit generate`: stream a continuation of PROMPT to stdout, statistics to stderr."""
from __future__ import annotations

import json
import sys

import click

from lowbit.cli.options import backend_option, device_options, model_option, quant_config_from
from lowbit.cli.report import format_generation_stats


@click.command()
@click.argument("prompt")
@model_option
@device_options
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-k", default=0, show_default=True, help="0 = off")
@click.option("--top-p", default=1.0, show_default=True, help="1 = off")
@click.option("--repetition-penalty", default=1.0, show_default=True, help="1 = off")
@click.option("--seed", default=None, type=int, help="seed for sampling")
@click.option("--stop", multiple=True, help="stop before this string (repeatable)")
@click.option("--chat", is_flag=True, help="wrap the prompt in the model's chat template")
@click.option("--weights", default="16", show_default=True,
              help="quantize the 16-bit model on the fly: 16, int8, int4")
@click.option("--group-size", default=None, type=int, help="int4/int8 group size [int4: 128]")
@click.option("--kv", default=None, type=click.Choice(["16", "8", "4"]),
              help="KV-cache bits [default: what a lowbit checkpoint records, else 16]")
@backend_option
@click.option("--json", "as_json", is_flag=True, help="statistics as one JSON object on stderr")
@click.option("--stats", "phase_stats", is_flag=True,
              help="also diagnose each phase against the device's measured limits (roofline)")
def generate(prompt, model, device, dtype, max_new_tokens, temperature, top_k, top_p,
             repetition_penalty, seed, stop, chat, weights, group_size, kv, backend, as_json,
             phase_stats):
    """Generate a continuation of PROMPT, streamed token by token."""
    from lowbit.engine.kernels import registry
    with registry.use_backend(backend):
        _generate(prompt, model, device, dtype, max_new_tokens, temperature, top_k, top_p,
                  repetition_penalty, seed, stop, chat, weights, group_size, kv, as_json,
                  phase_stats)


def _generate(prompt, model, device, dtype, max_new_tokens, temperature, top_k, top_p,
              repetition_penalty, seed, stop, chat, weights, group_size, kv, as_json, phase_stats):
    from lowbit.engine.generate import Generation
    from lowbit.engine.kernels import registry
    from lowbit.engine.load import load_model
    from lowbit.engine.sampling import SamplingConfig
    from lowbit.engine.streaming import TextStream

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    quant = quant_config_from(weights, group_size, False, int(kv or 16))
    loaded = load_model(model, device=device, dtype=dtype, quant=quant)
    kv = int(kv) if kv else (loaded.quant.kv_bits if loaded.quant else 16)
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    ids = tok.encode(text, add_special_tokens=not chat)
    stream = TextStream(tok, stop)
    gen = Generation(loaded.model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                     eos_ids=tok.eos_ids, kv_bits=kv, should_stop=lambda _: stream.stopped)
    out = sys.stdout
    for token in gen:
        piece = stream.push(token) if token not in tok.eos_ids else ""
        if piece:
            out.write(piece)
            out.flush()
    out.write(stream.flush() + "\n")
    out.flush()
    stats = gen.stats
    label = {"model": loaded.source, "weights": loaded.quant.name if loaded.quant else "16",
             "dtype": str(loaded.dtype).removeprefix("torch."), "backends": registry.chosen()}
    report = None
    if phase_stats:
        from lowbit.engine.device_limits import get_limits
        from lowbit.engine.profile import generation_phase_report
        limits = get_limits(loaded.device, announce=lambda m: click.echo(m, err=True))
        report = generation_phase_report(loaded.model, stats, limits, label["weights"])
    if as_json:
        click.echo(json.dumps({**label, **stats.to_dict(), "phases": report}), err=True)
    else:
        click.echo(format_generation_stats(stats, label), err=True)
        if report is not None:
            from lowbit.engine.profile import format_phase_report
            click.echo(format_phase_report(report), err=True)
