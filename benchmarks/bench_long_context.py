"""Long-context decode and prefill end to end: a Llama-3.1-8B-shaped model with random int4
weights (group 128), batch 1, KV cache in bf16 / int8 / int4 (GPU only).

    python benchmarks/bench_long_context.py [--out DIR] [--contexts 1024,8192,32768,131072]

Rows:
- "generate" (decode): for each KV width and context, the cache is FILLED WITH RANDOM K/V
  (labelled "random-fill": a 128k prefill would take minutes; decode speed does not depend on
  the values) and `--steps` CUDA-graph decode steps are timed at the last positions of the
  context. bytes_per_token = int4 weights read once (embedding: one row) + the KV cache of
  `context` positions at its stored width, scales included; limit_tok_s = copy GB/s / that;
  frac_limit = measured / limit (issue 5 target: >= 0.8 at 32k and 128k).
- "prefill": one real 32k-token chunked prefill (engine.generate.prefill, 2048-token chunks,
  bf16 KV), timed with int4 and with bf16 weights on the same card in the same run.
- "max_context": the largest context whose KV cache fits a 24 GiB GPU budget together with the
  int4 weights and the measured decode overhead (peak minus weights and cache at 1k), for each
  KV width; also reported uncapped by the model's 131072-position limit.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import fill_random  # noqa: E402
from common import format_table, measure_limits, write_results  # noqa: E402

import lowbit.engine.kernels.attention_backend  # noqa: E402,F401  (registers kv_attention triton)
import lowbit.engine.kernels.triton_backend  # noqa: E402,F401  (registers dequant_matmul triton)
from lowbit.engine.cuda_graph import GraphedDecodeStep  # noqa: E402
from lowbit.engine.generate import PREFILL_CHUNK, model_weight_bytes, prefill  # noqa: E402
from lowbit.engine.kernels import registry  # noqa: E402
from lowbit.engine.kv_cache import create_cache  # noqa: E402
from lowbit.engine.model_configs import named_config  # noqa: E402
from lowbit.engine.profile import model_layout  # noqa: E402
from lowbit.engine.random_model import random_model  # noqa: E402
from lowbit.quant.config import QuantConfig  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")
BUDGET_BYTES = 24 << 30
KV_NAMES = {16: "bf16", 8: "int8", 4: "int4"}


def kv_read_bytes(cache, context: int) -> float:
    return cache.bytes_per_token * context + getattr(cache, "residual_nbytes", 0)


def decode_row(model, cfg, bits: int, context: int, steps: int, limits, wbytes) -> dict:
    torch.cuda.reset_peak_memory_stats()
    cache = create_cache(bits, cfg, 1, context, DTYPE, DEVICE)
    with torch.inference_mode():
        step = GraphedDecodeStep(model, cache, DEVICE)
        fill_random(cache)  # after capture, whose scratch write went to position 0
        token = torch.zeros(1, dtype=torch.long, device=DEVICE)
        first = context - steps
        for p in range(first - 3, first):
            step(token, p)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for p in range(first, context):
            step(token, p)
        end.record()
        end.synchronize()
    tok_s = steps / (start.elapsed_time(end) / 1e3)
    nbytes = wbytes + kv_read_bytes(cache, context)
    limit = limits["copy_GBps"] * 1e9 / nbytes
    row = {"bench": "generate", "method": "lowbit-graph", "weights": "int4-g128",
           "kv": KV_NAMES[bits], "context": context, "fill": "random-fill",
           "decode_tok_s": round(tok_s, 1), "bytes_per_token_MB": round(nbytes / 1e6, 1),
           "kv_bytes_per_token": cache.bytes_per_token,
           "kv_vs_bf16": round(cache.bytes_per_token / (4 * cfg.num_layers * cfg.kv_size), 3),
           "limit_tok_s": round(limit, 1), "frac_limit": round(tok_s / limit, 3),
           "GBps": round(nbytes * tok_s / 1e9, 1), "kv_GB": round(cache.nbytes / 1e9, 2),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
    overhead = torch.cuda.max_memory_allocated() - model_weight_bytes(model) - cache.nbytes
    del step, cache
    gc.collect()
    torch.cuda.empty_cache()
    return row, overhead


def prefill_row(model, weights: str, ids, limits) -> dict:
    cfg = model.config
    t = ids.shape[1]
    cache = create_cache(16, cfg, 1, t, DTYPE, DEVICE)
    with torch.inference_mode():
        prefill(model, ids[:, :2 * PREFILL_CHUNK], cache)  # compile and tune on the real shapes
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prefill(model, ids, cache)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    params = 2 * cfg.num_layers * cfg.hidden_size * (cfg.q_size + cfg.kv_size) + \
        3 * cfg.num_layers * cfg.hidden_size * cfg.intermediate_size + \
        cfg.hidden_size * cfg.vocab_size  # every linear, whatever its stored format
    flops = 2 * params * t + 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * t  # causal
    del cache
    torch.cuda.empty_cache()
    return {"bench": "prefill", "method": f"lowbit-chunked-{PREFILL_CHUNK}", "weights": weights,
            "kv": "bf16", "context": t, "prefill_ms": round(seconds * 1e3, 1),
            "prefill_tok_s": round(t / seconds, 1),
            "TFLOPs": round(flops / seconds / 1e12, 1),
            "frac_matmul": round(flops / seconds / 1e12 / limits["matmul_TFLOPs"], 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1024,8192,32768,131072")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=32768, help="0 skips the prefill rows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    label, cfg = named_config("llama-3.1-8b")
    limits = measure_limits()
    rows = []
    model = random_model(cfg, DEVICE, DTYPE, QuantConfig(weight_bits=4, group_size=128))
    wbytes = model_layout(model, "measured").decode_weight_bytes  # one decode token
    overheads = {}
    contexts = [int(c) for c in args.contexts.split(",")]
    for bits in (16, 8, 4):
        for context in contexts:
            row, overhead = decode_row(model, cfg, bits, context, args.steps, limits, wbytes)
            overheads.setdefault(bits, overhead)
            rows.append(row)
            print(row, flush=True)
    for bits in (16, 8, 4):
        probe = create_cache(bits, cfg, 1, 1024, DTYPE, DEVICE)
        per_token = probe.bytes_per_token
        fixed = model_weight_bytes(model) + overheads[bits] + getattr(probe, "residual_nbytes", 0)
        del probe
        fit = int((BUDGET_BYTES - fixed) // per_token)
        rows.append({"bench": "max_context", "kv": KV_NAMES[bits], "budget_GiB": 24,
                     "weights": "int4-g128",
                     "weights_GB": round(model_weight_bytes(model) / 1e9, 2),
                     "overhead_GB": round(overheads[bits] / 1e9, 2),
                     "kv_bytes_per_token": per_token, "max_context_uncapped": fit,
                     "max_context": min(fit, cfg.max_position_embeddings)})
    if args.prefill:
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=DEVICE)
        rows.append(prefill_row(model, "int4-g128", ids, limits))
        print(rows[-1], flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        model = random_model(cfg, DEVICE, DTYPE, None)
        rows.append(prefill_row(model, "bf16", ids, limits))
        print(rows[-1], flush=True)
    path = write_results("long_context", rows, limits, args.out,
                         model=f"{label} (random weights)", backends=registry.chosen())
    print(format_table([r for r in rows if r["bench"] == "generate"],
                       ["kv", "context", "decode_tok_s", "limit_tok_s", "frac_limit",
                        "bytes_per_token_MB", "kv_vs_bf16", "peak_mem_gb"]))
    print(format_table([r for r in rows if r["bench"] == "max_context"],
                       ["kv", "kv_bytes_per_token", "overhead_GB", "max_context",
                        "max_context_uncapped"]))
    print(format_table([r for r in rows if r["bench"] == "prefill"],
                       ["weights", "context", "prefill_ms", "prefill_tok_s", "TFLOPs"]))
    print(f"limits {limits}; wrote {path}")


if __name__ == "__main__":
    main()
