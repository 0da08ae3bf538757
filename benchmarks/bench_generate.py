"""End-to-end generation speed on the GPU: lowbit bf16 / int8 / int4 against transformers'
generate(), same random-weight model, same card, same run.

    python benchmarks/bench_generate.py --config llama-3-8b --prompt 512 --new 256

Weights are random (speed does not depend on their values) and made directly on the GPU; every
row is labelled with the shape's name and "random". Decode is timed over `--new` tokens after a
warm-up generation of the same shape (graph capture and Triton autotuning stay out of the numbers);
the GB/s column is the bytes one decode token must read (every weight once at its stored width,
plus the KV cache filled so far, on average over the decode) divided by the time per token.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

from lowbit.engine.device_limits import get_limits  # noqa: E402
from lowbit.engine.generate import Generation  # noqa: E402
from lowbit.engine.load import load_model  # noqa: E402
from lowbit.engine.profile import model_layout  # noqa: E402
from lowbit.engine.model_configs import NAMED_CONFIGS, named_config  # noqa: E402
from lowbit.engine.random_model import random_model  # noqa: E402
from lowbit.quant.config import DEFAULT_KEEP_16BIT, QuantConfig  # noqa: E402

METHODS = {"bf16": None, "int8": QuantConfig(weight_bits=8, group_size=None),
           "int4-g128": QuantConfig(weight_bits=4, group_size=128),
           # does quantizing an untied lm_head pay? (Llama-3: 128256 x 4096, 1.05 GB in bf16)
           "int4-g128-lmhead16": QuantConfig(weight_bits=4, group_size=128,
                                             keep_16bit=DEFAULT_KEEP_16BIT + ("lm_head",)),
           "int4-g128-lmhead8": QuantConfig(weight_bits=4, group_size=128,
                                            keep_8bit=("lm_head",))}
DEFAULT_MODEL = "default"  # --config default: the embedded SmolLM2-135M-Instruct, real weights


def build(config: str, method: str, device):
    """(label, model, HF config dict for transformers or a model dir) for one method."""
    if config == DEFAULT_MODEL:
        from lowbit.quant.default_model import default_model_dir
        loaded = load_model(None, device=str(device), dtype="bf16", quant=METHODS[method])
        return "SmolLM2-135M-Instruct (real weights)", loaded.model, str(default_model_dir())
    label, cfg = named_config(config)
    model = random_model(cfg, device, torch.bfloat16, METHODS[method])
    return f"{label} (random weights)", model, NAMED_CONFIGS[config]


def time_lowbit(model, prompt_ids, new_tokens, kv_bits=16, repeats=3):
    """Stats of `repeats` timed generations after a warm-up, each phase's time the median of
    the runs (one sample of a 30-80 ms prefill varied by 2x between runs of one card)."""
    def run():
        gen = Generation(model, prompt_ids, max_new_tokens=new_tokens, kv_bits=kv_bits)
        for _ in gen:
            pass
        return gen.stats
    run()  # warm-up: graph capture, autotuning, allocator
    torch.cuda.reset_peak_memory_stats()
    runs = [run() for _ in range(repeats)]
    stats = runs[0]
    for phase in ("prefill_s", "ttft_s", "decode_s"):
        setattr(stats, phase, statistics.median(getattr(r, phase) for r in runs))
    stats.peak_mem_bytes = max(r.peak_mem_bytes for r in runs)
    return stats


def time_transformers(model, hf_source, prompt_ids, new_tokens, device):
    """transformers' generate() in bf16 on the very same weight tensors (no copy); `hf_source`
    is an HF config dict or a model directory."""
    import transformers
    hf_cfg = (transformers.AutoConfig.from_pretrained(hf_source) if isinstance(hf_source, str)
              else transformers.AutoConfig.for_model(**hf_source))
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    hf.load_state_dict(model.state_dict(), assign=True, strict=False)  # share our tensors
    hf.tie_weights()
    torch.cuda.empty_cache()
    hf.eval()
    ids = torch.tensor([prompt_ids], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    timed(4)
    prefill_s = timed(1)
    total_s = timed(new_tokens)
    decode_tok_s = (new_tokens - 1) / (total_s - prefill_s)
    del hf
    return prefill_s, decode_tok_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-3-8b", choices=sorted(NAMED_CONFIGS) + [DEFAULT_MODEL])
    ap.add_argument("--prompt", type=int, nargs="+", default=[512])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--methods", default="bf16,int8,int4-g128")
    ap.add_argument("--kv", type=int, nargs="+", default=[16])
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--name", default="generate")
    ap.add_argument("--out", default=None, help="folder for the JSON [benchmarks/results/<card>]")
    args = ap.parse_args()
    device = torch.device("cuda")
    limits = get_limits(device)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for method in args.methods.split(","):
        label, model, hf_source = build(args.config, method, device)
        torch.cuda.empty_cache()
        wbytes = model_layout(model, "measured").decode_weight_bytes  # one decode token
        vocab = model.config.vocab_size
        for prompt_len in args.prompt:
            prompt = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
            for kv in args.kv:
                st = time_lowbit(model, prompt, args.new, kv)
                kv_read = st.kv_bytes_per_token * (prompt_len + args.new / 2)
                gbps = (wbytes + kv_read) * st.decode_tok_s / 1e9
                rows.append({"bench": "generate", "method": f"lowbit-{method}", "model": label,
                             "weights": method, "kv": kv, "context": prompt_len + args.new,
                             "prompt": prompt_len, "new_tokens": args.new,
                             "decode_tok_s": round(st.decode_tok_s, 1),
                             "decode_GBps": round(gbps, 1),
                             "decode_frac_copy": round(gbps / limits.copy_GBps, 3),
                             "prefill_ms": round(st.prefill_s * 1e3, 2),
                             "ttft_ms": round(st.ttft_s * 1e3, 2),
                             "peak_mem_gb": round(st.peak_mem_bytes / 1e9, 2)})
                print(json.dumps(rows[-1]), flush=True)
            if method == "bf16" and not args.no_transformers:
                prefill_s, tok_s = time_transformers(model, hf_source, prompt, args.new, device)
                rows.append({"bench": "generate", "method": "transformers-generate-bf16",
                             "model": label, "weights": "bf16", "kv": 16,
                             "context": prompt_len + args.new, "prompt": prompt_len,
                             "new_tokens": args.new, "decode_tok_s": round(tok_s, 1),
                             "prefill_ms": round(prefill_s * 1e3, 2),
                             "ttft_ms": round(prefill_s * 1e3, 2), "peak_mem_gb": None})
                print(json.dumps(rows[-1]), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    path = write_results(args.name, rows, limits, out_dir=args.out)
    print(f"{'method':<28}{'prompt':>7}{'kv':>4}{'tok/s':>9}{'GB/s':>8}{'prefill ms':>12}{'peak GB':>9}")
    for r in rows:
        print(f"{r['method']:<28}{r['prompt']:>7}{r['kv']:>4}{r['decode_tok_s']:>9}"
              f"{str(r.get('decode_GBps', '-')):>8}{r['prefill_ms']:>12}{str(r['peak_mem_gb']):>9}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
