"""The `lowbit` command group; each command lives in its own module."""
import click

from lowbit.cli.bench import bench
from lowbit.cli.calibrate_device import calibrate_device
from lowbit.cli.compare import compare
from lowbit.cli.convert import convert
from lowbit.cli.errors import LowbitGroup
from lowbit.cli.export_hf import export_hf
from lowbit.cli.generate import generate
from lowbit.cli.info import info
from lowbit.cli.sensitivity import sensitivity


@click.group(cls=LowbitGroup)
@click.option("-v", "--verbose", is_flag=True, help="log kernel choices and progress details")
def cli(verbose):
    """lowbit: quantized low-memory LLM inference."""
    import logging
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(name)s: %(message)s")


for command in (generate, info, convert, compare, bench, sensitivity, calibrate_device, export_hf):
    cli.add_command(command)
