"""Accuracy of a model against a reference on fixed token windows: perplexity, per-token KL
divergence KL(P_ref || P_model) of the next-token distributions, and top-1 agreement.

Every window is scored on its own, from position 0 with an empty KV cache: position t predicts
token t + 1, so a window of L tokens scores L - 1 predictions. Log-probabilities are taken in
fp32 whatever the model's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.engine.kv_cache import create_cache
from lowbit.quant.text import TextError, evaluation_token_ranges

# Positions per KL chunk: bounds the fp32 temporaries to 3 × 256 × V floats (150 MB at V = 49152)
# however long the window.
KL_CHUNK = 256


class EvaluationError(ValueError):
    """An evaluation the model cannot run as asked (e.g. a window longer than its context)."""


@dataclass(frozen=True)
class Windows:
    """tokens: int64 (N, L), row i = token ids [ranges[i][0], ranges[i][1]) of the text."""

    tokens: torch.Tensor
    ranges: list[tuple[int, int]]
    requested: int  # how many windows were asked for; len(ranges) may be fewer

    def __len__(self) -> int:
        return len(self.ranges)


def split_windows(ids: list[int], n_windows: int, window_len: int) -> Windows:
    """The first `n_windows` consecutive, non-overlapping windows of `window_len` tokens (fewer
    when the text holds fewer); TextError when it does not hold one."""
    if window_len < 2:
        raise EvaluationError(f"a window needs at least 2 tokens, not {window_len}")
    if n_windows < 1:
        raise EvaluationError(f"evaluate at least one window, not {n_windows}")
    fit = min(n_windows, len(ids) // window_len)
    if fit == 0:
        raise TextError(f"the text has {len(ids)} tokens, fewer than one window of {window_len}; "
                        f"give a longer text or a smaller --window-len")
    ranges = evaluation_token_ranges(fit, window_len)
    tokens = torch.tensor(ids[:fit * window_len], dtype=torch.long).view(fit, window_len)  # (N, L)
    return Windows(tokens, ranges, n_windows)


def check_window_fits(window_len: int, context: int) -> None:
    if window_len > context:
        raise EvaluationError(f"a window of {window_len} tokens exceeds the model's context of "
                              f"{context}; use a smaller --window-len")


@torch.inference_mode()
def next_token_log_probs(model, window: torch.Tensor, kv_bits: int = 16) -> torch.Tensor:
    """window (L,) token ids → fp32 log-probs (L - 1, V): row t is the model's distribution of
    token t + 1. One forward over the window through a fresh `kv_bits` cache (a quantized cache
    attends exactly as token-by-token decode would)."""
    param = next(model.parameters())
    n = window.shape[0]
    check_window_fits(n, model.config.max_position_embeddings)
    cache = create_cache(kv_bits, model.config, 1, n, param.dtype, param.device)
    tokens = window.to(param.device)[None]  # (1, L)
    logits = model(tokens, torch.arange(n, device=param.device), cache, kv_len=n)  # (1, L, V)
    return torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (L - 1, V)


def nll_sum(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ_t −log p(targets[t]) for log_probs (T, V), targets (T,)."""
    picked = log_probs.gather(-1, targets.to(log_probs.device)[:, None])  # (T, 1)
    return -float(picked.double().sum())


def perplexity(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean negative log-likelihood of targets) for log_probs (T, V), targets (T,)."""
    return math.exp(nll_sum(log_probs, targets) / targets.numel())


def kl_per_token(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) in nats for each row of two (T, V) log-prob tensors → (T,) fp64."""
    out = []
    for s in range(0, ref_log_probs.shape[0], KL_CHUNK):
        ref, other = ref_log_probs[s:s + KL_CHUNK], log_probs[s:s + KL_CHUNK]  # (C, V)
        out.append((ref.exp() * (ref - other)).sum(-1).double())
    return torch.cat(out)


def top1_matches(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> int:
    """Rows whose argmax (the greedy next token) is the same in both (T, V) tensors."""
    return int((ref_log_probs.argmax(-1) == log_probs.argmax(-1)).sum())


@dataclass
class Tally:
    """Running sums over every scored position of every window."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, ref_log_probs: torch.Tensor, log_probs: torch.Tensor, targets: torch.Tensor):
        self.tokens += targets.numel()
        self.nll += nll_sum(log_probs, targets)
        self.kl += float(kl_per_token(ref_log_probs, log_probs).sum())
        self.agree += top1_matches(ref_log_probs, log_probs)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def kl_mean(self) -> float:
        return self.kl / self.tokens

    @property
    def top1_agreement(self) -> float:
        """Percent of positions where the greedy next token equals the reference's."""
        return 100.0 * self.agree / self.tokens


def bits_per_weight(model: torch.nn.Module) -> float:
    """Stored bits per weight over the quantized linears (scales and zero points included, biases
    not); 16 for a model with none: the reference is labelled by its stored 16-bit weights."""
    from lowbit.engine.bnb_linear import BnbLinear
    from lowbit.engine.linear import QuantizedLinear

    bits = weights = 0
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, BnbLinear)):
            bits += 8 * m.weight_format.nbytes
            weights += m.in_features * m.out_features
    return bits / weights if weights else 16.0
