"""`lowbit info`: what a model is, without loading its weights."""
from __future__ import annotations

import click

from lowbit.cli.report import human_bytes


@click.command()
@click.argument("model", required=False)
def info(model):
    """Architecture, parameters, dtype, context and weight bytes of MODEL (default: the embedded
    SmolLM2-135M-Instruct). MODEL is an HF directory, a GGUF file or a lowbit checkpoint."""
    from pathlib import Path

    from lowbit.quant.sources import is_lowbit_checkpoint, open_source

    if model is not None and is_lowbit_checkpoint(Path(model)):
        from lowbit.quant.checkpoint import describe_checkpoint
        rows = describe_checkpoint(Path(model))
    else:
        source = open_source(model)
        cfg = source.model_config
        n_params = cfg.num_parameters()
        dtype = source.dtype()
        rows = {
            "model": str(source.path),
            "architecture": f"{cfg.model_type} ({source.config.get('architectures', ['?'])[0]})",
            "parameters": f"{n_params / 1e6:.1f} M",
            "layers": cfg.num_layers,
            "hidden / intermediate": f"{cfg.hidden_size} / {cfg.intermediate_size}",
            "heads (query / KV)": f"{cfg.num_heads} / {cfg.num_kv_heads} × {cfg.head_dim}",
            "vocabulary": cfg.vocab_size,
            "context": cfg.max_position_embeddings,
            "rope": f"theta {cfg.rope_theta:g}" + (
                f", {cfg.rope_scaling.get('rope_type', cfg.rope_scaling.get('type'))} scaling"
                if cfg.rope_scaling else ""),
            "embeddings": "tied" if cfg.tie_word_embeddings else "untied",
            "dtype": str(dtype).removeprefix("torch."),
            "weight bytes": human_bytes(n_params * dtype.itemsize),
            "KV cache (16-bit)": f"{human_bytes(2 * cfg.num_layers * cfg.kv_size * dtype.itemsize)}/token",
        }
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        click.echo(f"{k:<{width}}  {v}")
