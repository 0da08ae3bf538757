"""Prefill the prompt, then decode one token at a time, yielding tokens as they are made and
recording per-phase statistics."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from lowbit.engine import timing
from lowbit.engine.cuda_graph import GraphedDecodeStep
from lowbit.engine.kv_cache import create_cache
from lowbit.engine.sampling import Sampler, SamplingConfig


class ContextTooLongError(ValueError):
    """Prompt plus requested tokens do not fit the model's context."""


class EmptyPromptError(ValueError):
    """Nothing to condition on."""


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # prompt in → first new token out (prefill + first sampling)
    decode_s: float = 0.0  # the decode steps after the first token
    peak_mem_bytes: int = 0
    weight_bytes: int = 0
    kv_bits: int = 16
    kv_bytes_per_token: int = 0
    kv_bytes_allocated: int = 0
    stop_reason: str = ""
    device: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1  # the first new token comes from prefill
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tok_s"] = self.prefill_tok_s
        d["decode_tok_s"] = self.decode_tok_s
        return d


def check_fits(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens == 0:
        raise EmptyPromptError("the prompt is empty: give at least one token of text")
    if prompt_tokens + max_new_tokens > context:
        raise ContextTooLongError(
            f"prompt ({prompt_tokens} tokens) + max new tokens ({max_new_tokens}) = "
            f"{prompt_tokens + max_new_tokens} exceeds the model's context of {context} tokens")


# Prompt tokens per prefill forward. Bounds every temporary of a long prompt by the chunk, not
# the prompt: a 32k prompt in one forward would build 32k x 32k attention masks and (B, 32k,
# 14336) MLP activations; in 2048-token chunks the MLP's matmuls are still compute-bound.
# A multiple of 32, so an int4 KV cache's key groups start at chunk boundaries.
PREFILL_CHUNK = 2048


def prefill(model, ids: torch.Tensor, cache, chunk: int | None = None) -> torch.Tensor:
    """Run the prompt ids (B, P) through the model into `cache`, `chunk` (default
    PREFILL_CHUNK) tokens per forward; returns the logits (B, 1, V) of the last prompt token."""
    chunk = chunk or PREFILL_CHUNK
    p = ids.shape[1]
    for s in range(0, p, chunk):
        e = min(p, s + chunk)
        logits = model(ids[:, s:e], torch.arange(s, e, device=ids.device), cache, kv_len=e,
                       last_only=True)
    return logits


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, each shared tensor once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class Generation:
    """Iterate to get new token ids as they are made; `stats` is complete once iteration ends.

    Stops at an EOS id, after max_new_tokens, or when `should_stop(ids)` (e.g. a stop string)
    says so. On CUDA, decode steps read the whole static cache under a mask, captured as a CUDA
    graph unless cuda_graph=False; the same ops run either way, so greedy output is identical.
    """

    def __init__(self, model, prompt_ids: list[int], *, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), eos_ids=(), kv_bits: int = 16,
                 should_stop=None, cuda_graph: bool | None = None):
        cfg = model.config
        check_fits(len(prompt_ids), max_new_tokens, cfg.max_position_embeddings)
        self.model, self.prompt_ids = model, list(prompt_ids)
        self.max_new_tokens, self.eos_ids = max_new_tokens, set(eos_ids)
        self.should_stop = should_stop
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.sampler = Sampler(sampling, self.device)
        self.use_history = sampling.repetition_penalty != 1.0
        self.cache = create_cache(kv_bits, cfg, 1, len(prompt_ids) + max_new_tokens,
                                  self.dtype, self.device)
        self.stats = GenerationStats(
            prompt_tokens=len(prompt_ids), device=str(self.device),
            weight_bytes=model_weight_bytes(model), kv_bits=kv_bits,
            kv_bytes_per_token=self.cache.bytes_per_token, kv_bytes_allocated=self.cache.nbytes)
        self.new_ids: list[int] = []
        on_cuda = self.device.type == "cuda"
        self.static_decode = on_cuda
        self.graphed = None
        # a module whose forward syncs with the host (LLM.int8's outlier search) cannot be
        # captured; it says why in `cuda_graph_unsafe`, and the stats carry the reason
        unsafe = sorted({m.cuda_graph_unsafe for m in model.modules()
                         if getattr(m, "cuda_graph_unsafe", None)})
        if on_cuda and cuda_graph is not False and unsafe:
            self.stats.extra["cuda_graph"] = "off: " + "; ".join(unsafe)
        elif on_cuda and cuda_graph is not False:
            with torch.inference_mode():
                self.graphed = GraphedDecodeStep(model, self.cache, self.device)

    def _decode_step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (1, V) for `token` at position `pos`."""
        if self.graphed is not None:
            return self.graphed(token, pos)
        if self.static_decode:
            positions = torch.full((1,), pos, dtype=torch.long, device=self.device)
            return self.model(token[:, None], positions, self.cache, kv_len=None)[:, -1]
        positions = torch.tensor([pos], device=self.device)
        return self.model(token[:, None], positions, self.cache, kv_len=pos + 1)[:, -1]

    @torch.inference_mode()
    def __iter__(self):
        dev, st = self.device, self.stats
        timing.reset_peak_memory(dev)
        ids = torch.tensor([self.prompt_ids], device=dev)  # (1, P)
        history = ids if self.use_history else None
        p = ids.shape[1]
        t0 = timing.now(dev)
        logits = prefill(self.model, ids, self.cache)
        st.prefill_s = timing.now(dev) - t0
        token = self.sampler(logits[:, -1], history)  # (1,)
        tok = int(token.item())
        st.ttft_s = timing.now(dev) - t0
        pos = p
        while True:
            self.new_ids.append(tok)
            st.new_tokens += 1
            yield tok
            if tok in self.eos_ids:
                st.stop_reason = "eos"
                break
            if self.should_stop is not None and self.should_stop(self.new_ids):
                st.stop_reason = "stop string"
                break
            if st.new_tokens >= self.max_new_tokens:
                st.stop_reason = "max new tokens"
                break
            if history is not None:
                history = torch.cat([history, token[:, None]], dim=1)
            # only the step itself is timed: what the consumer does with a token (printing) is not
            t_step = timing.now(dev)
            token = self.sampler(self._decode_step(token, pos), history)
            tok = int(token.item())
            st.decode_s += timing.now(dev) - t_step
            pos += 1
        st.peak_mem_bytes = timing.peak_memory_bytes(dev)
