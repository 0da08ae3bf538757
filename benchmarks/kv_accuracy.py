"""What KV-cache quantization costs in accuracy on the real default model (CPU, fp32 weights).

Each window of the news corpus runs in ONE forward through a cache of the asked bits (the int8/int4
reference attention makes that forward equal token-by-token decode), and is scored against the
same window through the 16-bit cache: perplexity, its change in %, mean per-token
KL(P_16 || P_kv) and top-1 agreement. Position t predicts token t + 1, so a window of 1024 tokens
scores 1023 predictions.

    python benchmarks/kv_accuracy.py --windows 8 --window-len 1024 --int4-sinks 0 4

One 1024-token window takes 20-140 s per cache on a shared 2-core CPU, so 8 windows x 3 caches
run 15-40 minutes: too slow for a test, hence a script. Measured (8 windows, 8184 predictions):
kv16 ppl 26.7846; kv8 26.7836 (-0.004%, KL 7.9e-4, top-1 0.984); kv4 27.1695 (+1.437%, KL 1.4e-2,
top-1 0.933).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit.engine.kernels.attention_quantized_reference  # noqa: F401  (registers int8/int4)
from lowbit.engine.kv_cache import create_cache
from lowbit.engine.kv_quant import Int4KVCache
from lowbit.engine.load import load_model


def corpus_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise SystemExit("the news corpus ships in the gensim wheel: pip install --no-deps gensim")
    return Path(spec.origin).parent / "test" / "test_data" / "lee_background.cor"


def window_log_probs(loaded, ids: torch.Tensor, kv: str) -> torch.Tensor:
    """(L - 1, V) fp32 log-probabilities of tokens 1..L-1 after one forward of ids (1, L) through
    a cache `kv`: "16", "8", "4", or "4+sinkN" (int4 with N 16-bit sink tokens)."""
    n = ids.shape[1]
    if "+sink" in kv:
        cache = Int4KVCache(loaded.config, 1, n, loaded.dtype, loaded.device,
                            sink_tokens=int(kv.split("+sink")[1]))
    else:
        cache = create_cache(int(kv), loaded.config, 1, n, loaded.dtype, loaded.device)
    logits = loaded.model(ids, torch.arange(n), cache, kv_len=n)  # (1, L, V)
    return F.log_softmax(logits[0, :-1].float(), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-len", type=int, default=1024)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--int4-sinks", type=int, nargs="*", default=[],
                    help="also run int4 with this many 16-bit sink tokens (each a row)")
    args = ap.parse_args()
    kinds = ["16", *map(str, args.bits), *(f"4+sink{n}" for n in args.int4_sinks if n)]

    loaded = load_model(None, device="cpu", dtype="fp32")
    ids = loaded.tokenizer.encode(corpus_path().read_text(encoding="utf-8"))
    n_windows = min(args.windows, len(ids) // args.window_len)
    totals = {kv: {"nll": 0.0, "kl": 0.0, "top1": 0} for kv in kinds}
    count = 0
    with torch.no_grad():
        for w in range(n_windows):
            window = torch.tensor(ids[w * args.window_len:(w + 1) * args.window_len])[None]
            targets = window[0, 1:]
            ref = None
            for kv in kinds:
                t0 = time.perf_counter()
                lp = window_log_probs(loaded, window, kv)
                t = totals[kv]
                t["nll"] += -lp.gather(1, targets[:, None]).sum().item()
                if ref is None:
                    ref = lp
                t["kl"] += (ref.exp() * (ref - lp)).sum().item()
                t["top1"] += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
                print(f"window {w} kv{kv}: {time.perf_counter() - t0:.1f} s, "
                      f"ppl so far {math.exp(t['nll'] / (count + len(targets))):.4f}", flush=True)
            count += len(targets)
    base = math.exp(totals["16"]["nll"] / count)
    print(f"\n{n_windows} windows x {args.window_len} tokens ({count} predictions), SmolLM2-135M "
          f"(dequantized Q4_1 GGUF), fp32, CPU")
    print(f"{'kv':>8} {'ppl':>9} {'dppl %':>8} {'mean KL':>10} {'top-1':>7}")
    for kv, t in totals.items():
        ppl = math.exp(t["nll"] / count)
        print(f"{kv:>8} {ppl:9.4f} {100 * (ppl / base - 1):+8.3f} {t['kl'] / count:10.2e} "
              f"{t['top1'] / count:7.4f}")


if __name__ == "__main__":
    main()
