"""Quantized-linear kernels against the baselines, on Llama-3-8B-shaped layers (GPU only).

For each method and activation rows M, the seven linears of a decoder layer (q, k, v, o, gate,
up, down) run over `--layers` distinct layers of random weights (8 x 0.44 GB in bf16, so nothing
is reused from the 50 MB L2) inside one CUDA graph; a row reports microseconds per layer, the
achieved GB/s of the bytes the method must read (weights at their real width + scales + zero
points + activations), TFLOP/s, and the speed-up over bf16 cuBLAS in the same run.

    python benchmarks/bench_kernels.py [--out DIR] [--m 1,4,16,64,512,2048] [--sweep]

--sweep first times candidate kernel plans of lowbit int4 g128 and int8 per layer shape and M
(the measurements behind default_plan); its table goes to sweep.json beside kernels.json.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, graph_bench_us, measure_limits, write_results  # noqa: E402

from lowbit.engine.kernels.triton_backend import dequant_matmul  # noqa: E402
from lowbit.engine.model_configs import named_config  # noqa: E402
from lowbit.engine.kernels.triton_common import Plan  # noqa: E402
from lowbit.quant.formats import Int4Weight, Int8Weight  # noqa: E402

LINEARS = [("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096), ("o", 4096, 4096),
           ("gate", 14336, 4096), ("up", 14336, 4096), ("down", 4096, 14336)]  # (name, N, K)
M_VALUES = (1, 4, 16, 64, 512, 2048)
DTYPE = torch.bfloat16


class Method:
    """prepare(w bf16 (N, K)) -> state; run(x (M, K), state) -> (M, N); nbytes(state): the
    weight-side bytes a call must read."""

    def __init__(self, name, prepare, run, nbytes):
        self.name, self.prepare, self.run, self.nbytes = name, prepare, run, nbytes


def _lowbit(name, quantize, plans):
    """plans: {(N, K, M): Plan} from the sweep (missing: the library's default_plan)."""
    def run(x, w):
        return dequant_matmul(x, w, None, plans.get((w.out_features, w.in_features, x.shape[0])))
    return Method(name, quantize, run, lambda w: w.nbytes)


def _tinygemm_prepare(w):
    """torch's int4 (tinygemm) layout from the same integer codes as lowbit int4 g128:
    nibbles with the even input index high, scales_and_zeros (G, N, 2) with w = (u-8)*s + zf,
    so lowbit's zero point z maps to zf = (8 - z) * s."""
    f = Int4Weight.quantize(w, 128, symmetric=False)
    u = f.unpacked()  # (N, K) uint8
    packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]), 8)
    s = f.scales.float()
    sz = torch.stack([s, (8 - f.zeros.float()) * s], dim=-1)  # (N, G, 2)
    return packed, sz.transpose(0, 1).contiguous().to(DTYPE), w.shape


def _bnb_methods():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        print(f"note: bitsandbytes is not importable ({e}); its rows are skipped")
        return []
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8 warns on every bf16 call

    def nf4_prepare(w):
        return bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")

    def nf4_bytes(state):
        packed, qs = state
        return packed.numel() * packed.element_size() + qs.absmax.numel() * qs.absmax.element_size()

    def int8_prepare(w):
        state = bnb.MatmulLtState()
        state.CB, state.SCB, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        state.threshold, state.has_fp16_weights, state.is_training = 6.0, False, False
        return state

    return [
        Method("bnb-nf4", nf4_prepare,
               lambda x, st: bnb.matmul_4bit(x, st[0].t(), quant_state=st[1]), nf4_bytes),
        Method("bnb-llm-int8", int8_prepare,
               lambda x, st: bnb.matmul(x, st.CB, state=st, threshold=6.0),
               lambda st: st.CB.numel() + st.SCB.numel() * st.SCB.element_size()),
    ]


def methods(tuned: dict, defaults_too: bool = False) -> list[Method]:
    """tuned: {format: {(N, K, M): Plan}} (int4 g64 falls back to the g128 plans); with
    defaults_too, each lowbit format also runs on the library's default_plan ("-default" rows:
    the plans before this sweep)."""
    int8 = lambda w: Int8Weight.quantize(w, None)  # noqa: E731
    g128 = lambda w: Int4Weight.quantize(w, 128, symmetric=False)  # noqa: E731
    g64 = lambda w: Int4Weight.quantize(w, 64, symmetric=False)  # noqa: E731
    defaults = [_lowbit("lowbit-int8-default", int8, {}),
                _lowbit("lowbit-int4-g128-default", g128, {}),
                _lowbit("lowbit-int4-g64-default", g64, {})] if defaults_too else []
    return [
        Method("bf16-cublas", lambda w: w, lambda x, w: F.linear(x, w),
               lambda w: w.numel() * w.element_size()),
        _lowbit("lowbit-int8", int8, tuned.get("int8", {})),
        _lowbit("lowbit-int4-g128", g128, tuned.get("int4-g128", {})),
        _lowbit("lowbit-int4-g64", g64, tuned.get("int4-g64", tuned.get("int4-g128", {}))),
        *defaults,
        Method("torch-int4-tinygemm", _tinygemm_prepare,
               lambda x, st: torch.ops.aten._weight_int4pack_mm(x, st[0], 128, st[1]),
               lambda st: st[0].numel() * st[0].element_size() + st[1].numel() * 2),
        *_bnb_methods(),
    ]


_gen: torch.Generator | None = None


def randn(*shape: int) -> torch.Tensor:
    """bf16 N(0, 1) from a private generator. After CUDA graph captures, torch 2.11's default
    generator refused to draw ("Offset increment outside graph capture encountered
    unexpectedly", seen on the H100 run of 2026-11-27)."""
    global _gen
    if _gen is None:
        _gen = torch.Generator(device="cuda").manual_seed(0)
    return torch.randn(*shape, device="cuda", dtype=DTYPE, generator=_gen)


def random_weights(layers: int, linears) -> list[dict[str, torch.Tensor]]:
    """Per layer {name: bf16 (N, K)} for `linears` [(name, N, K)]."""
    return [{name: randn(n, k) * 0.02 for name, n, k in linears} for _ in range(layers)]


def layer_linears(weights) -> list[tuple[str, int, int]]:
    """[(name, N, K)] of one layer of random_weights."""
    return [(name, *w.shape) for name, w in weights[0].items()]


def inputs(layers: int, m: int, linears) -> list[dict[int, torch.Tensor]]:
    """Per layer, one activation per input width (4096, 14336 for Llama-3-8B): rotated with the
    weights."""
    return [{k: randn(m, k) for k in {k for _, _, k in linears}} for _ in range(layers)]


def check_method(method: Method, w: torch.Tensor, state) -> float:
    """Relative error of the method's output against bf16 on this weight (a sanity check that
    each baseline computes the same product; int4 lands near 0.1, int8 near 0.01)."""
    x = randn(8, w.shape[1])
    ref = F.linear(x.float(), w.float())
    return ((method.run(x, state).float() - ref).norm() / ref.norm()).item()


def bench_methods(weights, m_values, tuned, defaults_too=False) -> tuple[list[dict], dict]:
    layers = len(weights)
    rows, checks = [], {}
    bf16_us = {}
    linears = layer_linears(weights)
    first = linears[0][0]
    for method in methods(tuned, defaults_too):
        try:
            states = [{name: method.prepare(w[name]) for name, _, _ in linears} for w in weights]
            checks[method.name] = round(check_method(method, weights[0][first],
                                                     states[0][first]), 4)
        except Exception as e:  # a baseline that cannot take these shapes is a result too
            print(f"{method.name}: {type(e).__name__}: {str(e)[:160]}")
            continue
        weight_bytes = sum(method.nbytes(states[0][name]) for name, _, _ in linears)
        for m in m_values:
            xs = inputs(layers, m, linears)

            def run_all():
                for layer, x in zip(states, xs):
                    for name, _, k in linears:
                        method.run(x[k], layer[name])

            us, graphed = graph_bench_us(run_all)
            us /= layers
            act_bytes = sum(m * k * 2 for _, _, k in linears)
            flops = sum(2 * m * n * k for _, n, k in linears)
            if method.name == "bf16-cublas":
                bf16_us[m] = us
            rows.append({"bench": "linear", "method": method.name, "M": m, "us": round(us, 2),
                         "GBps": round((weight_bytes + act_bytes) / us / 1e3, 1),
                         "TFLOPs": round(flops / us / 1e6, 2),
                         "speedup_vs_bf16": round(bf16_us[m] / us, 3),
                         **({} if graphed else {"timing": "eager"})})
            del xs
        del states
        torch.cuda.empty_cache()
    return rows, checks


# the defaults before the tensor-core path (CUDA-core GEMV at M=1, 16-row "dot" tiles above), as
# baselines, against the tensor-core path: mma.sync on 16 or 32 weight rows (1-2 warps), or
# wgmma on 64 (4 warps)
_GEMV = [Plan("gemv", 1, 64, prefetch=True, waves=8)]
_DOT = [Plan("dot", 16, 64, num_stages=3)]


def _tc(m: int) -> list[Plan]:
    """Tensor-core decode plans with m activation rows a tile (the MMA's N, 8 or 16)."""
    return [Plan("tc", m, 32, num_warps=2, num_stages=3, waves=8),
            Plan("tc", m, 16, num_warps=1, num_stages=3, waves=16),
            Plan("tc", m, 64, num_warps=4, num_stages=4, waves=8)]


SWEEP_PLANS = {
    "int4": {1: _GEMV + _tc(8), 4: _DOT + _tc(8), 16: _DOT + _tc(16),
             64: [Plan("dot", 64, 64, num_stages=3), Plan("dequant")],
             512: [Plan("dequant")], 2048: [Plan("dequant")]},
    "int8": {1: _GEMV + _tc(8)[:1], 4: _DOT + _tc(8)[:1], 16: _DOT + _tc(16)[:1],
             64: [Plan("dot", 64, 64, num_stages=3), Plan("dequant")],
             512: [Plan("dequant")], 2048: [Plan("dequant")]},
}


def rel_err(x, q, plan) -> float:
    """Relative error of a plan's output against dequantize-then-matmul in fp32."""
    ref = F.linear(x.float(), q.dequantize(torch.float32))
    out = dequant_matmul(x, q, None, plan).float()
    return ((out - ref).norm() / ref.norm()).item()


def sweep(weights, m_values) -> tuple[list[dict], dict]:
    """Per (format, layer shape, M, plan): microseconds per call, rotating over the layers, and
    the plan's relative error (a plan over 2e-2, bf16's bound in the tests, is never picked).
    Returns the rows and the fastest correct plan {format: {(N, K, M): Plan}}."""
    formats = {"int4-g128": lambda w: Int4Weight.quantize(w, 128, symmetric=False),
               "int4-g64": lambda w: Int4Weight.quantize(w, 64, symmetric=False),
               "int8": lambda w: Int8Weight.quantize(w, None)}
    shapes = {(n, k): name for name, n, k in layer_linears(weights)}  # k and v share a shape
    rows, best = [], {}
    for fmt, quantize in formats.items():
        for (n, k), name in shapes.items():
            qs = [quantize(w[name]) for w in weights]
            for m in m_values:
                xs = [randn(m, k) for _ in qs]
                fastest = None
                for plan in SWEEP_PLANS[fmt[:4]].get(m, []):
                    def run_all():
                        for x, q in zip(xs, qs):
                            dequant_matmul(x, q, None, plan)
                    try:
                        err = rel_err(xs[0], qs[0], plan)
                        us = graph_bench_us(run_all, warmup_ms=10, rep_ms=40)[0] / len(qs)
                    except Exception as e:  # a plan the compiler rejects is a result too
                        rows.append({"format": fmt, "shape": f"{n}x{k}", "M": m, "plan": str(plan),
                                     "us": None, "error": f"{type(e).__name__}: {e}"[:200]})
                        continue
                    nbytes = qs[0].nbytes + m * k * 2
                    rows.append({"format": fmt, "shape": f"{n}x{k}", "M": m, "plan": str(plan),
                                 "us": round(us, 2), "GBps": round(nbytes / us / 1e3, 1),
                                 "TFLOPs": round(2 * m * n * k / us / 1e6, 2),
                                 "rel_err": round(err, 5)})
                    if err < 2e-2 and (fastest is None or us < fastest[0]):
                        fastest = (us, plan)
                if fastest is not None:
                    best.setdefault(fmt, {})[(n, k, m)] = fastest[1]
            del qs
    return rows, best


def engine_linears(config: str) -> list[tuple[str, int, int]]:
    """A named config's decoder-layer linears as the engine runs them (q/k/v and gate/up fused)."""
    _, cfg = named_config(config)
    qkv = cfg.q_size + 2 * cfg.kv_size
    return [("qkv", qkv, cfg.hidden_size), ("o", cfg.hidden_size, cfg.q_size),
            ("gate_up", 2 * cfg.intermediate_size, cfg.hidden_size),
            ("down", cfg.hidden_size, cfg.intermediate_size)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for the JSON (default benchmarks/results/<card>)")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-layers", type=int, default=4,
                    help="weight copies each sweep timing rotates over")
    ap.add_argument("--defaults-too", action="store_true",
                    help="also time the lowbit formats on the library's default_plan")
    ap.add_argument("--name", default="kernels", help="results file name (without .json)")
    ap.add_argument("--config", default=None,
                    help="time this named config's fused layer linears instead of Llama-3-8B's 7")
    args = ap.parse_args()
    linears = engine_linears(args.config) if args.config else LINEARS
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_kernels needs CUDA and the Triton compiler (TRITON_INTERPRET unset)")
    m_values = [int(v) for v in args.m.split(",")]
    limits = measure_limits()
    print(f"limits: {limits}")
    weights = random_weights(args.layers, linears)
    tuned = {}
    if args.sweep:
        sweep_rows, tuned = sweep(weights[:args.sweep_layers], m_values)
        write_results("sweep" if args.name == "kernels" else f"sweep-{args.name}", [], limits,
                      args.out, sweep=sweep_rows)
        cols = ["format", "shape", "M", "plan", "us", "GBps", "TFLOPs", "rel_err"]
        print(format_table(sweep_rows, cols))
        print("\nfastest correct plan per shape (used for the lowbit rows below):")
        print("\n".join(f"{fmt} {n}x{k} M={m}: {plan}" for fmt, table in tuned.items()
                        for (n, k, m), plan in table.items()))
    rows, checks = bench_methods(weights, m_values, tuned, args.defaults_too)
    plans = {fmt: {f"{n}x{k}/M={m}": str(p) for (n, k, m), p in t.items()}
             for fmt, t in tuned.items()}
    path = write_results(args.name, rows, limits, args.out, checks_rel_err=checks,
                         lowbit_plans=plans or "default_plan")
    print(f"\nrelative error vs bf16 ({linears[0][0]}, M=8): {checks}")
    print(f"wrote {path}\n")
    print(format_table(rows, ["method", "M", "us", "GBps", "TFLOPs", "speedup_vs_bf16"]))


if __name__ == "__main__":
    main()
