"""CPU decode speed of lowbit against transformers' generate(): the default model, fp32, greedy,
the same prompt, side by side in one run.

    python benchmarks/bench_cpu_generate.py --new 64 --repeats 3

Both generate exactly --new tokens (EOS ignored) after one warm-up; the table shows the median of
--repeats runs. Decode tok/s counts the tokens after the first (the first comes from prefill).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import results_path, run_header  # noqa: E402

from lowbit.engine.device_limits import get_limits  # noqa: E402
from lowbit.engine.generate import Generation  # noqa: E402
from lowbit.engine.load import load_model  # noqa: E402
from lowbit.quant.default_model import default_model_dir  # noqa: E402

PROMPT = ("The Australian Broadcasting Corporation reported on Tuesday that firefighters were "
          "still battling several blazes across New South Wales, where")


def lowbit_run(loaded, ids, new):
    gen = Generation(loaded.model, ids, max_new_tokens=new)
    out = list(gen)
    return gen.stats.prefill_s, gen.stats.decode_tok_s, out


def transformers_run(hf, ids, new):
    x = torch.tensor([ids])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
        total = time.perf_counter() - t0
    return prefill, (new - 1) / (total - prefill), out[0, len(ids):].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers
    loaded = load_model(None, device="cpu", dtype="fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    ids = loaded.tokenizer.encode(PROMPT)
    results = {}
    for name, fn, m in (("lowbit", lowbit_run, loaded), ("transformers", transformers_run, hf)):
        fn(m, ids, 8)  # warm-up
        runs = [fn(m, ids, args.new) for _ in range(args.repeats)]
        results[name] = {"prefill_ms": statistics.median(r[0] for r in runs) * 1e3,
                         "decode_tok_s": statistics.median(r[1] for r in runs),
                         "tokens": runs[0][2]}
    same = results["lowbit"]["tokens"] == results["transformers"]["tokens"]
    limits = get_limits(torch.device("cpu"))
    rows = [{"bench": "generate", "method": name, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
             "weights": "fp32", "kv": 16, "context": len(ids) + args.new, "prompt": len(ids),
             "decode_tok_s": round(r["decode_tok_s"], 2), "prefill_ms": round(r["prefill_ms"], 1),
             "ttft_ms": None, "peak_mem_gb": None} for name, r in results.items()]
    out = results_path("cpu_generate.json", card="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**run_header(limits), "threads": torch.get_num_threads(),
                               "same_greedy_tokens": same, "rows": rows}, indent=1))
    print(f"{'engine':<14}{'prompt':>7}{'new':>5}{'prefill ms':>12}{'decode tok/s':>14}")
    for r in rows:
        print(f"{r['method']:<14}{r['prompt']:>7}{args.new:>5}{r['prefill_ms']:>12}{r['decode_tok_s']:>14}")
    print(f"identical greedy tokens: {same}; {torch.get_num_threads()} threads; wrote {out}")


if __name__ == "__main__":
    main()
