"""Next-token selection: greedy by default; temperature, top-k, top-p, repetition penalty, seed."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """A sampling setting out of range."""


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top-k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition penalty must be > 0, not {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, cfg: SamplingConfig, device: torch.device):
        self.cfg = cfg
        self.generator = None
        if not cfg.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """logits (B, V) fp32-able; history (B, N) ids seen so far → next ids (B,)."""
        cfg = self.cfg
        logits = logits.float()
        if cfg.repetition_penalty != 1.0 and history is not None and history.numel():
            # CTRL-style: divide positive logits, multiply negative ones, for tokens already seen
            seen = logits.gather(1, history)
            seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
            logits = logits.scatter(1, history, seen)
        if cfg.greedy:
            return logits.argmax(dim=-1)
        logits = logits / cfg.temperature
        if cfg.top_k:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
            drop = drop_sorted.scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
