"""`lowbit export-hf`: write a model source (a GGUF file, an HF directory, or the embedded
default model) as a plain 16-bit Hugging Face directory."""
from __future__ import annotations

import click

from lowbit.cli.report import human_bytes


@click.command("export-hf")
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] OUT")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
def export_hf(paths, force):
    """Write SRC (default: the embedded SmolLM2-135M-Instruct) to the directory OUT as
    config.json, model.safetensors and tokenizer files that transformers and lowbit load."""
    import time

    from lowbit.quant.export_hf import export_hf as export
    from lowbit.quant.sources import ModelSourceError, open_source

    if len(paths) > 2:
        raise click.UsageError("expected [SRC] OUT")
    src, out = (None, paths[0]) if len(paths) == 1 else paths
    start = time.perf_counter()
    try:
        source = open_source(src)
        source.validate()
        nbytes = export(source, out, force=force)
    except ModelSourceError as e:
        raise click.ClickException(str(e)) from None
    cfg = source.model_config
    click.echo(f"exported {source.path.name} ({cfg.model_type}, {cfg.num_parameters() / 1e6:.1f} M "
               f"parameters, {str(source.dtype()).removeprefix('torch.')}, {human_bytes(nbytes)}) "
               f"to {out} in {time.perf_counter() - start:.1f} s")
