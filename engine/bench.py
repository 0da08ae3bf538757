"""llama-bench-style throughput tests: prompt processing (ppN) and token generation (tgN).

ppN: prefill of N random prompt tokens into an empty cache, N / prefill seconds.
tgN: N decode steps after a one-token prompt, N / decode seconds (each step reads the whole model
     and the cache so far: the memory-bound phase).
Both run through `Generation`, the same path `lowbit generate` takes (CUDA graphs included), with
no EOS so every run makes exactly its tokens. One untimed warm-up run of each test precedes the
repetitions (allocator, autotuning, graph capture). Each result carries the per-phase roofline
diagnosis of its mean time.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from lowbit.engine.device_limits import DeviceLimits
from lowbit.engine.generate import Generation
from lowbit.engine.profile import model_layout, phase_report


@dataclass
class BenchResult:
    test: str                 # "pp512", "tg128"
    tokens: int
    seconds: list[float]      # one per repetition
    phase: dict               # profile's phase dict for the mean time

    @property
    def tok_s(self) -> list[float]:
        return [self.tokens / s for s in self.seconds]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.tok_s)

    @property
    def std(self) -> float:
        """Sample standard deviation of tokens/s (0 for a single repetition)."""
        return statistics.stdev(self.tok_s) if len(self.seconds) > 1 else 0.0


def random_prompt(vocab_size: int, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (n,), generator=gen).tolist()


def _generate(model, prompt: list[int], new_tokens: int, kv_bits: int):
    gen = Generation(model, prompt, max_new_tokens=new_tokens, kv_bits=kv_bits)
    for _ in gen:
        pass
    return gen.stats


def run_test(model, kind: str, tokens: int, repetitions: int, kv_bits: int, seed: int,
             limits: DeviceLimits, weights_name: str) -> BenchResult:
    """Run "pp" or "tg" with `tokens` tokens `repetitions` times after one warm-up."""
    cfg = model.config
    prefill = kind == "pp"
    prompt = random_prompt(cfg.vocab_size, tokens if prefill else 1, seed)
    new_tokens = 1 if prefill else tokens + 1  # tg: the first new token comes from prefill
    _generate(model, prompt, new_tokens, kv_bits)
    runs = [_generate(model, prompt, new_tokens, kv_bits) for _ in range(repetitions)]
    samples = [st.prefill_s if prefill else st.decode_s for st in runs]
    mean_s, stats = statistics.fmean(samples), runs[-1]
    report = phase_report(
        cfg, model_layout(model, weights_name), prompt_tokens=stats.prompt_tokens,
        new_tokens=stats.new_tokens, prefill_s=mean_s if prefill else 0.0,
        decode_s=0.0 if prefill else mean_s, kv_bytes_per_token=stats.kv_bytes_per_token,
        kv_bits=kv_bits, act_bytes=next(model.parameters()).element_size(), limits=limits)
    return BenchResult(f"{kind}{tokens}", tokens, samples,
                       report["prefill" if prefill else "decode"])
