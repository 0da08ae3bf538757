"""Accuracy of lowbit checkpoints (calibrated or not) against the 16-bit model they came from, on
exactly the windows and metrics `lowbit compare` uses (engine/evaluate.py: the first N × L tokens
of the news corpus, per-token KL, perplexity, top-1), until compare takes checkpoints itself.

    python benchmarks/calibration_accuracy.py CKPT [CKPT ...] [--windows 8] [--json PATH]

The reference is the checkpoint's recorded source (lowbit.json "source"), loaded in fp32 on the
CPU; every checkpoint must share it. A checkpoint whose calibration record does not show it was
kept off the evaluated tokens is flagged in its row.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from lowbit.engine.evaluate import Tally, bits_per_weight, next_token_log_probs, split_windows
from lowbit.engine.load import load_model
from lowbit.quant.calibration_text import overlapping_evaluation
from lowbit.quant.checkpoint import read_checkpoint
from lowbit.quant.text import default_text_path, read_text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=1024)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    sources = {read_checkpoint(c).source["path"] for c in args.checkpoints}
    if len(sources) != 1:
        sys.exit(f"checkpoints come from different sources: {sorted(sources)}")
    ref = load_model(sources.pop(), device="cpu", dtype="fp32")
    text_path = default_text_path()
    sha = hashlib.sha256(text_path.read_bytes()).hexdigest()
    ids = ref.tokenizer.encode(read_text(text_path), add_special_tokens=False)
    windows = split_windows(ids, args.windows, args.window_len)
    models = {c: load_model(c, device="cpu", dtype="fp32") for c in args.checkpoints}
    base, tallies = Tally(), {c: Tally() for c in models}
    start = time.perf_counter()
    for w in windows.tokens:
        r = next_token_log_probs(ref.model, w)
        base.add(r, r, w[1:])
        for c, m in models.items():
            tallies[c].add(r, next_token_log_probs(m.model, w), w[1:])
    rows = []
    print(f"{'checkpoint':<40} {'method':>6} {'bits/w':>6} {'ppl':>8} {'Δppl %':>7} "
          f"{'KL':>7} {'top-1 %':>7}  note")
    for c, t in tallies.items():
        quant = models[c].quant
        note = overlapping_evaluation(quant.calibration, sha, windows.tokens.numel()) or ""
        row = {"checkpoint": c, "method": quant.method, "weights": quant.name,
               "bits_per_weight": bits_per_weight(models[c].model), "ppl": t.perplexity,
               "ppl_delta_pct": 100 * (t.perplexity / base.perplexity - 1), "kl_mean": t.kl_mean,
               "top1_agreement": t.top1_agreement, "note": note}
        rows.append(row)
        print(f"{Path(c).name:<40} {row['method']:>6} {row['bits_per_weight']:6.3f} "
              f"{row['ppl']:8.3f} {row['ppl_delta_pct']:+7.2f} {row['kl_mean']:7.4f} "
              f"{row['top1_agreement']:7.2f}  {note}")
    print(f"reference ppl {base.perplexity:.3f} over {base.tokens} positions "
          f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"reference_ppl": base.perplexity,
                                               "tokens": base.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
