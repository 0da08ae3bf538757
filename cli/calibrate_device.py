"""`lowbit calibrate-device`: measure the device's copy bandwidth and matmul throughput again."""
from __future__ import annotations

import json

import click


@click.command("calibrate-device")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--show", is_flag=True, help="print the cached limits without measuring")
@click.option("--json", "as_json", is_flag=True, help="the limits as one JSON object")
def calibrate_device(device, show, as_json):
    """Measure (and cache) the limits every roofline verdict is judged against: a large device
    copy (bytes read + written per second) and a large matmul (16-bit on CUDA, fp32 on CPU)."""
    from lowbit.engine.device_limits import (DeviceLimitsError, cache_path, cached_limits,
                                             calibrate)
    from lowbit.engine.load import resolve_device

    dev = resolve_device(device)
    try:
        limits = cached_limits(dev) if show else calibrate(dev)
    except DeviceLimitsError as e:
        raise click.ClickException(str(e)) from None
    if limits is None:
        raise click.ClickException(f"{dev} has not been measured yet; run "
                                   f"`lowbit calibrate-device --device {dev}`")
    if as_json:
        click.echo(json.dumps(limits.to_dict()))
    else:
        click.echo(limits.describe())
        click.echo(f"cached in {cache_path()}")
