import click


@click.group()
def cli():
    """lowbit: quantized low-memory LLM inference."""
