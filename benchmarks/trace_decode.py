"""Where a decode step's GPU time goes: kernels per token and their summed durations, by family.

    python benchmarks/trace_decode.py --config llama-3-8b --methods bf16,int4-g128 --context 1024

Runs the decode step eagerly under torch.profiler (a graph replay would hide its kernels from some
CUPTI versions); the GPU-side kernel durations are what a graph replays, while the gaps between
them are not: compare "kernel sum" with bench_generate's graphed ms/token to see the launch gaps.
Families are matched on the kernel's name, so a fused kernel shows up under its own name.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

from lowbit.engine.device_limits import get_limits  # noqa: E402
from lowbit.engine.kv_cache import create_cache  # noqa: E402
from lowbit.engine.model_configs import named_config  # noqa: E402
from lowbit.engine.random_model import random_model  # noqa: E402
from bench_generate import METHODS  # noqa: E402

# first matching substring names the family; the order puts specific names before generic ones
FAMILIES = [("gemv/matmul", ("matmul", "gemv", "gemm", "cutlass", "sm90_xmma", "nvjet", "dequant")),
            ("attention", ("attention", "_decode_", "flash", "fmha")),
            ("kv write", ("kv_update", "index_copy", "scatter", "quantize")),
            ("norm", ("rms", "norm")),
            ("rotary", ("rotary", "rope")),
            ("silu", ("silu",)),
            ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "cat", "copy"))]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def trace(model, cfg, kv_bits: int, context: int, steps: int, device) -> dict:
    cache = create_cache(kv_bits, cfg, 1, context + steps + 1, torch.bfloat16, device)
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    pos = torch.full((1,), context, dtype=torch.long, device=device)
    for _ in range(3):  # autotuning and lazy allocations stay out of the trace
        model(token, pos, cache, kv_len=None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model(token, pos, cache, kv_len=None)
        torch.cuda.synchronize()
    per_family: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    names: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        fam = per_family[family(ev.name)]
        fam[0] += 1 / steps
        fam[1] += us / steps
        nm = names[ev.name[:90]]
        nm[0] += 1 / steps
        nm[1] += us / steps
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:12]
    return {"kernels_per_token": round(sum(v[0] for v in per_family.values()), 1),
            "kernel_sum_ms": round(sum(v[1] for v in per_family.values()) / 1e3, 3),
            "families": {k: {"kernels": round(v[0], 1), "us": round(v[1], 1)}
                         for k, v in sorted(per_family.items(), key=lambda kv: -kv[1][1])},
            "top_kernels": {k: {"kernels": round(v[0], 1), "us": round(v[1], 1)} for k, v in top}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-3-8b")
    ap.add_argument("--methods", default="bf16,int4-g128")
    ap.add_argument("--kv", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--name", default="trace-decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("trace_decode.py needs a CUDA GPU")
    device = torch.device("cuda")
    label, cfg = named_config(args.config)
    rows = []
    for method in args.methods.split(","):
        model = random_model(cfg, device, torch.bfloat16, METHODS[method])
        with torch.inference_mode():
            row = {"method": method, "kv": args.kv, "context": args.context, "model": label,
                   **trace(model, cfg, args.kv, args.context, args.steps, device)}
        print(json.dumps(row, indent=1))
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    write_results(args.name, rows, get_limits(device), out_dir=args.out)


if __name__ == "__main__":
    main()
