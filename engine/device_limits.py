"""The device's measured limits: copy bandwidth and matmul throughput, measured once and cached.

Roofline verdicts and "fraction of the limit" figures are only as honest as these ceilings, so they
are measured on the machine, not taken from a datasheet:
- copy: `dst.copy_(src)` of a buffer far larger than any cache; it moves 2 × nbytes (read + write).
- matmul: a square 16-bit matmul on CUDA (bf16 where supported, else fp16), fp32 on CPU (what
  lowbit runs there by default); 2·n³ FLOPs.
Each is the median of several timed repeats after warm-up. Results are cached as JSON in
$LOWBIT_CACHE/device_limits.json (default ~/.cache/lowbit/), keyed by device name + torch version,
because a new torch can change both. `lowbit calibrate-device` measures again.

A datasheet value, where the card is known, is carried beside the measurement and always labelled
as a datasheet figure; it is never used for a verdict.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

CACHE_FILE = "device_limits.json"

# Datasheet peaks (dense, no sparsity), TB/s of memory bandwidth and bf16 TFLOP/s; matched by a
# substring of torch.cuda.get_device_name(). Shown only beside measurements, labelled as such.
DATASHEETS: dict[str, tuple[float, float]] = {
    "H100 80GB HBM3": (3350.0, 989.4),   # H100 SXM5
    "H100 PCIe": (2000.0, 756.0),
    "H100 NVL": (3900.0, 835.0),
    "H200": (4800.0, 989.4),
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100-SXM4-40GB": (1555.0, 312.0),
    "A100-PCIE-40GB": (1555.0, 312.0),
    "A100 80GB PCIe": (1935.0, 312.0),
    "L4": (300.0, 121.0),
}

# Sizes: large enough to leave every cache and reach steady clocks, small enough to take seconds.
CUDA_COPY_BYTES = 1 << 30    # 1 GiB each way: 2 GiB moved per copy, ~0.7 ms on an H100
CUDA_MATMUL_N = 8192         # 1.1 TFLOP per product, ~1.6 ms on an H100
CPU_COPY_BYTES = 256 << 20   # 256 MiB: ~100× a server L3 slice
CPU_MATMUL_N = 2048          # 17 GFLOP per product, ~0.1-0.3 s on a few cores
CUDA_REPEATS, CPU_REPEATS = 20, 5


class DeviceLimitsError(ValueError):
    """The limits cache cannot be read or the device cannot be measured; the message says why."""


@dataclass(frozen=True)
class DeviceLimits:
    device: str              # "NVIDIA H100 80GB HBM3", "cpu: AMD EPYC (2 threads)"
    torch: str
    copy_GBps: float         # bytes read + written per second / 1e9
    matmul_TFLOPs: float
    matmul_dtype: str        # "bfloat16", "float16", "float32"
    measured: str            # ISO date-time (UTC) of the measurement
    datasheet_copy_GBps: float | None = None
    datasheet_matmul_TFLOPs: float | None = None

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy_GBps * 1e9

    @property
    def matmul_flops_per_s(self) -> float:
        return self.matmul_TFLOPs * 1e12

    @property
    def ridge(self) -> float:
        """FLOP per byte where the matmul ceiling meets the bandwidth ceiling: an operation with a
        higher arithmetic intensity is compute-bound on this device, a lower one memory-bound."""
        return self.matmul_flops_per_s / self.copy_bytes_per_s

    def to_dict(self) -> dict:
        return {**asdict(self), "ridge_flop_per_byte": self.ridge}

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceLimits":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        try:
            return cls(**fields)
        except TypeError as e:
            raise DeviceLimitsError(f"malformed device limits entry: {e}") from None

    def describe(self) -> str:
        text = (f"{self.device}: copy {self.copy_GBps:,.1f} GB/s, {self.matmul_dtype} matmul "
                f"{self.matmul_TFLOPs:,.2f} TFLOP/s (measured {self.measured[:10]}), "
                f"ridge {self.ridge:,.1f} FLOP/byte")
        if self.datasheet_copy_GBps is not None:
            text += (f"; datasheet: {self.datasheet_copy_GBps:,.0f} GB/s, "
                     f"{self.datasheet_matmul_TFLOPs:,.0f} TFLOP/s bf16")
        return text


def cache_path() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit"
    return Path(root).expanduser() / CACHE_FILE


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """A name that identifies what limits apply: the card, or the CPU model and the thread count
    torch uses (a CPU's matmul ceiling scales with threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu: {_cpu_model()} ({torch.get_num_threads()} threads)"
    raise DeviceLimitsError(f"cannot measure limits of a {device.type} device; use cpu or cuda")


def cache_key(device: torch.device | str) -> str:
    return f"{device_name(device)} | torch {torch.__version__}"


def datasheet(name: str) -> tuple[float, float] | None:
    """(GB/s, bf16 TFLOP/s) from the card's datasheet, or None for an unknown device."""
    for pattern, values in DATASHEETS.items():
        if pattern in name:
            return values
    return None


def _timed_median(device: torch.device, fn: Callable[[], None], repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs, after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy(device: torch.device, nbytes: int, repeats: int) -> float:
    """GB/s of bytes read + written by a device-to-device copy of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = _timed_median(device, lambda: dst.copy_(src), repeats)
    return 2 * nbytes / seconds / 1e9


def matmul_dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def measure_matmul(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    """TFLOP/s of an (n × n) @ (n × n) product in `dtype`."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _timed_median(device, lambda: torch.mm(a, b, out=out), repeats)
    return 2 * n ** 3 / seconds / 1e12


def measure_limits(device: torch.device | str) -> DeviceLimits:
    """Measure copy bandwidth and matmul throughput now (seconds; nothing is cached)."""
    device = torch.device(device)
    name = device_name(device)
    cuda = device.type == "cuda"
    repeats = CUDA_REPEATS if cuda else CPU_REPEATS
    dtype = matmul_dtype_for(device)
    copy = measure_copy(device, CUDA_COPY_BYTES if cuda else CPU_COPY_BYTES, repeats)
    flops = measure_matmul(device, CUDA_MATMUL_N if cuda else CPU_MATMUL_N, dtype, repeats)
    sheet = datasheet(name) if cuda else None
    return DeviceLimits(
        device=name, torch=torch.__version__, copy_GBps=round(copy, 2),
        matmul_TFLOPs=round(flops, 4), matmul_dtype=str(dtype).removeprefix("torch."),
        measured=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        datasheet_copy_GBps=sheet[0] if sheet else None,
        datasheet_matmul_TFLOPs=sheet[1] if sheet else None)


def _read_cache(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DeviceLimitsError(f"cannot read the device limits cache {path}: {e}; delete it or "
                                f"run `lowbit calibrate-device`") from None
    if not isinstance(data, dict):
        raise DeviceLimitsError(f"{path} does not hold a JSON object; delete it or run "
                                f"`lowbit calibrate-device`")
    return data


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".device_limits.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; it holds nothing secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_limits(device: torch.device | str) -> DeviceLimits | None:
    """The cached limits of this device and torch version, or None if never measured."""
    entry = _read_cache(cache_path()).get(cache_key(device))
    return None if entry is None else DeviceLimits.from_dict(entry)


def calibrate(device: torch.device | str) -> DeviceLimits:
    """Measure now and store in the cache, replacing any earlier entry for this key."""
    limits = measure_limits(device)
    path = cache_path()
    data = _read_cache(path)
    data[cache_key(device)] = asdict(limits)
    _write_cache(path, data)
    return limits


def get_limits(device: torch.device | str,
               announce: Callable[[str], None] | None = None) -> DeviceLimits:
    """Cached limits, measured (and cached) first if this device was never measured.
    `announce` is told before a measurement starts, so a command can say why it pauses."""
    limits = cached_limits(device)
    if limits is None:
        if announce is not None:
            announce(f"measuring the limits of {device_name(device)} once "
                     f"(cached in {cache_path()}; `lowbit calibrate-device` redoes it)")
        limits = calibrate(device)
    return limits
