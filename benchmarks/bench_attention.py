"""Decode attention alone (one new token, batch 1), Llama-3-8B shape (32 query heads, 8 KV heads,
head_dim 128), at 1k / 8k / 32k / 128k filled positions: bf16 SDPA against lowbit's Triton
kernel over bf16, int8 and int4 KV (GPU only).

    python benchmarks/bench_attention.py [--out DIR] [--contexts 1024,8192,32768,131072]
        [--sweep [--sweep-context 1024,8192,32768]]

Each timed call runs the op over `layers` distinct layers of the cache inside one CUDA graph
(enough layers that their K/V exceed the 50 MB L2, as consecutive layers of a real step do),
and do_bench flushes L2 between repeats; a row reports microseconds per layer and the achieved
GB/s of the K/V bytes one layer must read at the cache's real width (codes + scales + zeros +
the int4 residual window), so GB/s compares directly with the device copy bandwidth.

Baseline "sdpa-bf16": torch SDPA over the filled K/V only (length known on the host, the GQA
group folded into query rows so each K/V byte is read once; flash attention on H100).
"--sweep" also times launch variants at each of --sweep-context's contexts (a comma list,
default 32k; added to --contexts) and prints each as it is measured: SPLIT_SWEEP (min_blocks:
fewer, longer splits where a short context's step is fixed latency) at every one, SHORT_SWEEP
(fewer splits, wider programs) below 32k, SWEEP (splits, warps, positions per warp or block,
pipeline stages) at 32k and up.
A variant that only re-plans the splits is skipped where its plan (splits holding keys, blocks
per split) was already timed at that context, the default's included. Sweep rows carry
"config" (decode_attention's keyword arguments) and "plan" (splits x blocks). At 1k, 8k and 32k:
~53 variants, each timed over the same layers as the default row.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, graph_bench_us, measure_limits, write_results  # noqa: E402

from lowbit.engine.kernels.attention_quantized_reference import exact_decode_attention  # noqa: E402
from lowbit.engine.kernels.triton_decode_attention import (decode_attention,  # noqa: E402
                                                            launch_plan)
from lowbit.engine.kernels.triton_decode_split import split_plan  # noqa: E402
from lowbit.engine.kv_cache import create_cache  # noqa: E402
from lowbit.engine.model_configs import named_config  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = "cuda"
L2_SPAN = 256 << 20  # bytes of K/V a timed call walks through: 5x the H100's 50 MB L2


def fill_random(cache) -> None:
    """Random bytes in every buffer (codes, scales, zeros): speed does not depend on values, but
    zeros can run faster than real data. Scales are drawn positive and small so no overflow."""
    for name, t in vars(cache).items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.is_floating_point():
            t.uniform_(0.001, 0.01) if "scale" in name else t.normal_()
        elif t.dtype == torch.uint8:
            t.random_(0, 16 if "zero" in name else 256)
        else:
            t.random_(-127, 128)


def kv_bytes_per_layer(cache, n: int) -> float:
    """Bytes one layer's attention must read at n filled positions, at the stored width."""
    per_token = cache.bytes_per_token / cache.num_layers  # steady state, scales included
    residual = getattr(cache, "residual_nbytes", 0) / cache.num_layers
    return per_token * n + residual


def make_cache(bits: int, cfg, n: int, layers: int):
    import dataclasses
    small = dataclasses.replace(cfg, num_layers=layers)
    cache = create_cache(bits, small, 1, n, DTYPE, DEVICE)
    fill_random(cache)
    return cache


def reference_output(cache, n: int, q) -> torch.Tensor:
    """Layer 0's attention of q at position n - 1 in fp64 from the cache's exact contents."""
    return exact_decode_attention(cache, 0, q, n)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double()
    return float(f"{((got - want).norm() / want.norm()).item():.2e}")


def time_lowbit(cache, n: int, layers: int, q, **launch) -> float:
    pos = torch.tensor([n - 1], device=DEVICE)

    def run():
        for layer in range(layers):
            decode_attention(q, cache, layer, pos, **launch)
    us, graphed = graph_bench_us(run)
    assert graphed, "the decode kernel must be capturable"
    return us / layers


def time_sdpa(cache, n: int, layers: int, q) -> float:
    b, h, _, d = q.shape
    hkv = cache.k.shape[2]
    qg = q.reshape(b, hkv, h // hkv, d)  # (B, Hkv, G, D): the group as query rows

    def run():
        for layer in range(layers):
            k, v = cache.k[layer, :, :, :n], cache.v[layer, :, :, :n]
            F.scaled_dot_product_attention(qg, k, v)
    us, _ = graph_bench_us(run)
    return us / layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,8192,32768,131072")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-context", default="32768",
                    help="comma list of contexts the sweep runs at")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    _, cfg = named_config("llama-3-8b")
    limits = measure_limits()
    rows = []
    q = torch.randn(1, cfg.num_heads, 1, cfg.head_dim, device=DEVICE, dtype=DTYPE)
    sweep_contexts = {int(c) for c in args.sweep_context.split(",")} if args.sweep else set()
    for n in sorted({int(c) for c in args.contexts.split(",")} | sweep_contexts):
        for bits, kv in ((16, "bf16"), (8, "int8"), (4, "int4")):
            per_layer_16 = 2 * cfg.num_kv_heads * n * cfg.head_dim * 2
            layers = max(1, min(32, math.ceil(L2_SPAN / per_layer_16 * (16 / bits))))
            cache = make_cache(bits, cfg, n, layers)
            nbytes = kv_bytes_per_layer(cache, n)
            ref = reference_output(cache, n, q)
            pos = torch.tensor([n - 1], device=DEVICE)
            timings = [("lowbit", time_lowbit(cache, n, layers, q),
                        rel_err(decode_attention(q, cache, 0, pos), ref))]
            if bits == 16:
                timings.append(("sdpa", time_sdpa(cache, n, layers, q), None))
            for method, us, err in timings:
                rows.append({"bench": "attention", "method": f"{method}-{kv}", "kv": kv,
                             "context": n, "us": round(us, 2),
                             "GBps": round(nbytes / us / 1e3, 1),
                             "frac_copy": round(nbytes / us / 1e3 / limits["copy_GBps"], 3),
                             "kv_MB_per_layer": round(nbytes / 1e6, 2), "layers_timed": layers,
                             **({} if err is None else {"rel_err_vs_ref": err})})
            if n in sweep_contexts:
                rows += sweep(cache, n, layers, q, kv, nbytes, limits, ref)
            del cache
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    path = write_results("attention", rows, limits, args.out,
                         shape="llama-3-8b: 32 q heads, 8 kv heads, head_dim 128, batch 1")
    print(format_table([r for r in rows if "config" not in r],
                       ["method", "context", "us", "GBps", "frac_copy", "kv_MB_per_layer",
                        "rel_err_vs_ref"]))
    sweep_rows = [r for r in rows if "config" in r]
    if sweep_rows:
        print(format_table(sweep_rows, ["method", "context", "config", "plan", "us", "GBps",
                                        "frac_copy", "rel_err_vs_default", "rel_err_vs_ref"]))
    print(f"limits {limits}; wrote {path}")


LONG_CONTEXT = 32768
# at every sweep context: fewer, longer splits where the context is short, all of them at long
# contexts (a plan equal to the default's is skipped)
SPLIT_SWEEP = {kv: [dict(min_blocks=b) for b in (2, 4, 8, 16)] for kv in ("bf16", "int8", "int4")}
# below LONG_CONTEXT: fewer splits outright, and wider programs for the longer splits
SHORT_SWEEP = {
    "bf16": [dict(splits=s) for s in (8, 16)]
    + [dict(block_n=128, min_blocks=4), dict(num_warps=8, min_blocks=8)],
    "int8": [dict(splits=s) for s in (8, 16)] + [dict(num_warps=8, warp_tokens=32, min_blocks=4)],
    "int4": [dict(splits=s) for s in (8, 16)] + [dict(num_warps=8, min_blocks=4)],
}

# at sweep contexts of LONG_CONTEXT and more
SWEEP = {
    "bf16": [dict(splits=s) for s in (32, 64, 128)]
    + [dict(block_n=32), dict(block_n=128), dict(num_warps=8)],
    # warp_tokens x num_warps positions an iteration; splits default to 2 programs per SM
    "int8": [dict(num_warps=w, warp_tokens=t) for w, t in ((4, 32), (4, 64), (2, 64), (2, 32),
                                                          (8, 32))]
    + [dict(num_warps=4, warp_tokens=32, splits=s) for s in (16, 64, 128)]
    + [dict(num_warps=2, warp_tokens=64, num_stages=3)],
    # num_warps x 32 positions (one key group a warp) an iteration; splits default to 2
    # programs per SM
    "int4": [dict(num_warps=w) for w in (4, 2, 8, 1)]
    + [dict(num_warps=4, splits=s) for s in (16, 64, 128)]
    + [dict(num_warps=2, splits=128), dict(num_warps=4, num_stages=3)],
}


def sweep(cache, n, layers, q, kv, nbytes, limits, ref) -> list[dict]:
    """Each variant timed, and its output on layer 0 compared with the default launch's and
    with the fp64 reference where there is one (a fast variant that computes something else
    must not be picked)."""
    pos = torch.tensor([n - 1], device=DEVICE)
    want = decode_attention(q, cache, 0, pos).double()
    out = []
    window = cache.sliding_window

    def plan(launch):
        _, cfg, block, splits = launch_plan(q, cache, **launch)
        return split_plan(n, block, splits, cfg["min_blocks"], window)
    timed_plans = {plan({})}
    for launch in SPLIT_SWEEP[kv] + (SWEEP[kv] if n >= LONG_CONTEXT else SHORT_SWEEP[kv]):
        per, nsplit = plan(launch)
        if set(launch) <= {"splits", "min_blocks"}:
            if (per, nsplit) in timed_plans:
                print(f"sweep {kv} {launch}: plan {nsplit}x{per} already timed, skipped")
                continue
            timed_plans.add((per, nsplit))
        try:
            got = decode_attention(q, cache, 0, pos, **launch).double()
            us = time_lowbit(cache, n, layers, q, **launch)
        except Exception as e:  # a variant that fails to compile is reported, not fatal
            print(f"sweep {kv} {launch}: {type(e).__name__}: {str(e)[:200]}")
            continue
        err = ((got - want).norm() / want.norm()).item()
        row = {"bench": "attention-sweep", "method": f"lowbit-{kv}", "kv": kv,
               "context": n, "config": " ".join(f"{k}={v}" for k, v in launch.items()),
               "plan": f"{nsplit}x{per}",
               "us": round(us, 2), "GBps": round(nbytes / us / 1e3, 1),
               "frac_copy": round(nbytes / us / 1e3 / limits["copy_GBps"], 3),
               "rel_err_vs_default": float(f"{err:.2e}"), "rel_err_vs_ref": rel_err(got, ref)}
        print(f"sweep {kv:5s} {n:6d} {row['config']:30s} {row['plan']:>6s} {row['us']:7.2f} us "
              f"{row['GBps']:8.1f} GB/s {row['frac_copy']:.3f} of copy, rel err vs default "
              f"{err:.1e}", flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    main()
