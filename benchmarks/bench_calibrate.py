"""Calibration cost on the GPU: time and peak memory of `search` and `gptq` on a random
Llama-3-8B-shaped model, layer by layer, exactly as `lowbit convert --method ... --device cuda`
runs it (engine/calibrate.py), minus writing the checkpoint.

    python benchmarks/bench_calibrate.py --config llama-3-8b --tokens 32768 --methods gptq,search

Weights are random (time does not depend on their values; accuracy is measured on the real
default model, not here) and every tensor is drawn on the GPU when the driver asks the source for
it, seeded by its name: the model is never held whole, on the host or the device, just as a
real source streams one layer. Calibration tokens are random ids in windows of --window-len.
Targets (issue 7): an 8B model in ≤ 20 minutes with peak GPU memory ≤ 24 GB.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import format_table, measure_limits, write_results  # noqa: E402

from lowbit.engine.calibrate import CalibrationSettings, calibrate  # noqa: E402
from lowbit.engine.model_configs import named_config  # noqa: E402
from lowbit.quant.config import QuantConfig  # noqa: E402
from lowbit.quant.sources import ModelSource  # noqa: E402

WEIGHT_STD = 0.02


class RandomDeviceSource(ModelSource):
    """A ModelSource whose tensors are drawn on `device` on request: N(0, 0.02) weights (norms 1),
    the same values for the same name every time (the driver reads a layer's weights twice)."""

    def __init__(self, label: str, cfg, device: torch.device, dtype=torch.bfloat16):
        self.path = Path(f"random:{label}")
        self.config = {}
        self.model_config = cfg
        self.fingerprint = f"random-{label}"
        self.device, self._dtype = device, dtype
        self._shapes = cfg.tensor_shapes()

    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])

    def get_tensor(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device, dtype=self._dtype)
        gen = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
        return torch.empty(shape, device=self.device, dtype=self._dtype).normal_(
            0.0, WEIGHT_STD, generator=gen)

    def dtype(self) -> torch.dtype:
        return self._dtype


def run(source, quant, method, windows, device) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    n = 0
    for _, fmt in calibrate(source, quant, CalibrationSettings(method), windows, device,
                            torch.bfloat16, progress=True):
        n += 1
        del fmt
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"bench": "calibrate", "method": method, "weights": quant.name,
            "tokens": windows.numel(), "window_len": windows.shape[1], "linears": n,
            "seconds": round(seconds, 1), "minutes": round(seconds / 60, 2),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama-3-8b")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--window-len", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--methods", default="gptq,search")
    p.add_argument("--layers", type=int, default=None,
                   help="calibrate only the first N decoder layers (plus lm_head) and extrapolate "
                        "the full model's minutes linearly in the layer count (an upper bound: "
                        "lm_head's share is counted once per N layers)")
    p.add_argument("--out", default=None, help="results folder [default: results/<card>]")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_calibrate needs a CUDA device")
    device = torch.device("cuda")
    label, cfg = named_config(args.config)
    full_layers = cfg.num_layers
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=min(args.layers, full_layers))
    source = RandomDeviceSource(label, cfg, device)
    quant = QuantConfig(weight_bits=4, group_size=args.group_size)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, cfg.vocab_size, (args.tokens // args.window_len, args.window_len),
                            generator=gen)
    rows = []
    for method in args.methods.split(","):
        row = run(source, quant, method, windows, device)
        row["model"] = f"{label} (random)"
        row["layers"] = f"{cfg.num_layers} of {full_layers}"
        row["full_model_minutes_upper_bound"] = round(row["minutes"] * full_layers / cfg.num_layers, 2)
        rows.append(row)
        print(format_table([row], list(row)), flush=True)
    path = write_results("calibrate", rows, measure_limits(), args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
