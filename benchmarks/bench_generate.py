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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import results_path, run_header  # noqa: E402

from lowbit.engine.device_limits import get_limits  # noqa: E402
from lowbit.engine.generate import Generation  # noqa: E402
from lowbit.engine.linear import swap_linears  # noqa: E402
from lowbit.engine.load import empty_model  # noqa: E402
from lowbit.engine.model_configs import NAMED_CONFIGS, named_config  # noqa: E402
from lowbit.quant.config import QuantConfig  # noqa: E402

METHODS = {"bf16": None, "int8": QuantConfig(weight_bits=8, group_size=None),
           "int4-g128": QuantConfig(weight_bits=4, group_size=128)}


def random_model(cfg, device, seed=0):
    """Random bf16 weights, generated on the device (an 8B model never touches host memory)."""
    torch.manual_seed(seed)
    model = empty_model(cfg, device, torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.tie_weights()
    return model.eval()


def weight_bytes_per_token(model) -> int:
    """Bytes one decode token reads from the weights: everything but the embedding table, of which
    it reads one row."""
    emb = model.model.embed_tokens.weight
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.data_ptr() == emb.data_ptr():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if model.config.tie_word_embeddings:
        total += emb.numel() * emb.element_size()  # lm_head reads the whole shared table
    return total + emb.shape[1] * emb.element_size()


def time_lowbit(model, prompt_ids, new_tokens, kv_bits=16):
    def run():
        gen = Generation(model, prompt_ids, max_new_tokens=new_tokens, kv_bits=kv_bits)
        for _ in gen:
            pass
        return gen
    run()  # warm-up: graph capture, autotuning, allocator
    torch.cuda.reset_peak_memory_stats()
    gen = run()
    return gen.stats


def time_transformers(model, cfg_dict, prompt_ids, new_tokens, device):
    """transformers' generate() in bf16 on the very same weight tensors (no copy)."""
    import transformers
    hf_cfg = transformers.AutoConfig.for_model(**cfg_dict)
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
    ap.add_argument("--config", default="llama-3-8b", choices=sorted(NAMED_CONFIGS))
    ap.add_argument("--prompt", type=int, nargs="+", default=[512])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--methods", default="bf16,int8,int4-g128")
    ap.add_argument("--kv", type=int, nargs="+", default=[16])
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    label, cfg = named_config(args.config)
    limits = get_limits(device)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for method in args.methods.split(","):
        model = random_model(cfg, device)
        if METHODS[method] is not None:
            swap_linears(model, METHODS[method])
        torch.cuda.empty_cache()
        wbytes = weight_bytes_per_token(model)
        for prompt_len in args.prompt:
            prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen).tolist()
            for kv in args.kv:
                st = time_lowbit(model, prompt, args.new, kv)
                kv_read = st.kv_bytes_per_token * (prompt_len + args.new / 2)
                per_token_s = 1 / st.decode_tok_s
                row = {"bench": "generate", "method": f"lowbit-{method}", "model": f"{label} (random)",
                       "weights": method, "kv": kv, "context": prompt_len + args.new,
                       "prompt": prompt_len, "new_tokens": args.new,
                       "decode_tok_s": round(st.decode_tok_s, 1),
                       "decode_GBps": round((wbytes + kv_read) / per_token_s / 1e9, 1),
                       "decode_frac_copy": round((wbytes + kv_read) / per_token_s / 1e9 / limits.copy_GBps, 3),
                       "prefill_ms": round(st.prefill_s * 1e3, 2), "ttft_ms": round(st.ttft_s * 1e3, 2),
                       "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if method == "bf16" and not args.no_transformers:
            from lowbit.engine.model_configs import NAMED_CONFIGS as named
            for prompt_len in args.prompt:
                prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen).tolist()
                prefill_s, tok_s = time_transformers(model, named[args.config], prompt, args.new, device)
                row = {"bench": "generate", "method": "transformers-generate-bf16",
                       "model": f"{label} (random)", "weights": "bf16", "kv": 16,
                       "context": prompt_len + args.new, "prompt": prompt_len, "new_tokens": args.new,
                       "decode_tok_s": round(tok_s, 1), "prefill_ms": round(prefill_s * 1e3, 2),
                       "ttft_ms": round(prefill_s * 1e3, 2), "peak_mem_gb": None}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    out = Path(args.out) if args.out else results_path("generate.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**run_header(limits), "rows": rows}, indent=1))
    print(f"{'method':<28}{'prompt':>7}{'kv':>4}{'tok/s':>9}{'GB/s':>8}{'prefill ms':>12}{'peak GB':>9}")
    for r in rows:
        print(f"{r['method']:<28}{r['prompt']:>7}{r['kv']:>4}{r['decode_tok_s']:>9}"
              f"{str(r.get('decode_GBps', '-')):>8}{r['prefill_ms']:>12}{str(r['peak_mem_gb']):>9}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
