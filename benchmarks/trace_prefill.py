"""Is a prefill bound by the host or by the GPU? Wall time of one prompt's prefill against the
summed time of the GPU kernels it launches (GPU only, random weights).

    python benchmarks/trace_prefill.py [--config llama-3-8b] [--prompt 512 2048]
                                       [--methods bf16,int4-g128,int8] [--out DIR]

Per method and prompt length: the wall milliseconds of 5 eager prefills after a warm-up (median
and all), then one more under torch.profiler: its wall time, the kernels' summed device time and
count, and the five kernels that took longest. Wall well above the kernel sum means Python and
launch overhead, not the GPU, set the time to first token. JSON to trace-prefill.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import METHODS  # noqa: E402
from common import format_table, write_results  # noqa: E402

from lowbit.engine.device_limits import get_limits  # noqa: E402
from lowbit.engine.generate import prefill  # noqa: E402
from lowbit.engine.kv_cache import create_cache  # noqa: E402
from lowbit.engine.model_configs import named_config  # noqa: E402
from lowbit.engine.random_model import random_model  # noqa: E402

RUNS = 5


def _prefill_ms(model, ids, device) -> float:
    cache = create_cache(16, model.config, 1, ids.shape[1] + 8, torch.bfloat16, device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    prefill(model, ids, cache)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def trace(model, ids, device) -> dict:
    _prefill_ms(model, ids, device)  # warm-up: Triton compiles, cuBLAS picks, buffers grow
    walls = [_prefill_ms(model, ids, device) for _ in range(RUNS)]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        profiled = _prefill_ms(model, ids, device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name[:60]] = by_name.get(e.name[:60], 0.0) + e.device_time / 1e3
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:5])
    return {"wall_ms_median": round(statistics.median(walls), 2),
            "wall_ms_runs": [round(w, 2) for w in walls], "profiled_wall_ms": round(profiled, 2),
            "kernel_ms": round(sum(e.device_time for e in kernels) / 1e3, 2),
            "kernels": len(kernels), "top_kernels_ms": {k: round(v, 2) for k, v in top.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-3-8b")
    ap.add_argument("--prompt", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--methods", default="bf16,int4-g128,int8")
    ap.add_argument("--out", default=None, help="folder for the JSON [benchmarks/results/<card>]")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("trace_prefill needs CUDA")
    device = torch.device("cuda")
    limits = get_limits(device)
    label, cfg = named_config(args.config)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for method in args.methods.split(","):
        model = random_model(cfg, device, torch.bfloat16, METHODS[method])
        for p in args.prompt:
            ids = torch.randint(0, cfg.vocab_size, (1, p), device=device, generator=gen)
            rows.append({"method": method, "model": f"{label} (random weights)", "prompt": p,
                         **trace(model, ids, device)})
            print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    print(f"wrote {write_results('trace-prefill', rows, limits, args.out)}")
    print(format_table(rows, ["method", "prompt", "wall_ms_median", "profiled_wall_ms",
                              "kernel_ms", "kernels"]))


if __name__ == "__main__":
    main()
