"""Calibrated quantization: run the 16-bit model one decoder layer at a time over calibration
text, collect each linear's input statistics, quantize the layer ("search" or "gptq", the math is
in lowbit.quant.search / lowbit.quant.gptq), then run the QUANTIZED layer to make the next
layer's inputs, so each layer is calibrated on what it will see at inference.

Only one decoder layer's weights are ever loaded (read from the ModelSource, tensor by tensor), so
a model larger than memory calibrates; what stays resident is the calibration hidden states
(tokens × hidden) plus one layer's activations. Inside a layer the linears are quantized in the
order data flows (q/k/v, then o, then gate/up, then down), each from inputs that already went
through the quantized linears before it ("true sequential"): the attention output is computed
once with o_proj swapped out, and the MLP's product once with down_proj swapped out, so this
costs no extra forward passes.

Statistics per input site (q/k/v share one, gate/up share one), accumulated in fp32:
  Σx² per input column → importance = mean x² (the search's weights)
  XᵀX                  → H = XᵀX / n (GPTQ's Hessian; only for gptq)

Device-agnostic: everything runs on `device` (CPU fp32, or CUDA in bf16/fp16 with fp32
statistics); formats come back on the CPU, ready for the checkpoint writer.
"""
from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lowbit.engine.kv_cache import DenseKVCache
from lowbit.engine.model import DecoderLayer, RMSNorm
from lowbit.engine.rope import Rotary
from lowbit.quant.checkpoint import quantized_linears
from lowbit.quant.config import QuantConfig, QuantConfigError
from lowbit.quant.formats import Int4Weight, Int8Weight
from lowbit.quant.gptq import DEFAULT_BLOCK, DEFAULT_DAMP, ORDERS, gptq_quantize
from lowbit.quant.progress import Progress
from lowbit.quant.search import search_quantize
from lowbit.quant.sources import ModelSource

CALIBRATED_METHODS = ("search", "gptq")
# Tokens per forward chunk: bounds one chunk's MLP activations (8192 x 1536 fp32 = 50 MB on the
# default model, 8192 x 14336 bf16 = 235 MB on Llama-3-8B) while keeping Python overhead small.
CHUNK_TOKENS = 8192

WeightFormat = Int4Weight | Int8Weight


@dataclass(frozen=True)
class CalibrationSettings:
    method: str = "gptq"
    damp: float = DEFAULT_DAMP  # GPTQ: fraction of mean diag(H) added to the diagonal
    block_size: int = DEFAULT_BLOCK  # GPTQ: columns per lazy-update block
    order: str = "static"  # GPTQ column order, measured in quant/gptq.py

    def __post_init__(self):
        if self.method not in CALIBRATED_METHODS:
            raise QuantConfigError(f"calibration method must be one of {CALIBRATED_METHODS}, "
                                   f"not {self.method!r}")
        if self.order not in ORDERS:
            raise QuantConfigError(f"GPTQ order must be one of {ORDERS}, not {self.order!r}")

    def to_dict(self) -> dict:
        if self.method == "search":
            return {"method": "search"}
        return dataclasses.asdict(self)


class InputStats:
    """Running statistics of the inputs (..., K) of one or more linears that share them."""

    def __init__(self, k: int, device: torch.device, hessian: bool):
        self.n = 0
        self.sq = torch.zeros(k, device=device)
        self.xtx = torch.zeros(k, k, device=device) if hessian else None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, K)
        self.n += x.shape[0]
        self.sq += x.square().sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    @property
    def importance(self) -> torch.Tensor:
        """(K,) mean of x² per input column."""
        return self.sq / max(self.n, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """(K, K) XᵀX / n."""
        return self.xtx / max(self.n, 1)


def quantize_linear(w: torch.Tensor, stats: InputStats, cfg: QuantConfig,
                    settings: CalibrationSettings, scale_dtype: torch.dtype) -> WeightFormat:
    """One linear's weight (N, K) → its format, as cfg (already `for_module`) asks."""
    if settings.method == "gptq":
        return gptq_quantize(w, stats.hessian, cfg.weight_bits, cfg.group_size, cfg.symmetric,
                             scale_dtype, damp=settings.damp, block_size=settings.block_size,
                             order=settings.order)
    return search_quantize(w, stats.importance, cfg.weight_bits, cfg.group_size, cfg.symmetric,
                           scale_dtype)


@contextmanager
def _without(module: nn.Module, child: str) -> Iterator[None]:
    """Replace module.<child> by identity inside the block (to read what flows into it)."""
    kept = getattr(module, child)
    setattr(module, child, nn.Identity())
    try:
        yield
    finally:
        setattr(module, child, kept)


def load_layer(source: ModelSource, index: int, device: torch.device,
               dtype: torch.dtype) -> DecoderLayer:
    """Decoder layer `index` of `source`, alone, on `device` in `dtype` (as layer 0 of a one-layer
    model, so it attends through a one-layer cache)."""
    cfg = source.model_config
    with torch.device("meta"):
        layer = DecoderLayer(cfg, 0)
    layer = layer.to_empty(device=device).to(dtype)
    for name, p in layer.named_parameters():
        p.data.copy_(source.get_tensor(f"model.layers.{index}.{name}").to(device, dtype))
    return layer.eval()


class LayerCalibrator:
    """Calibrates a model's layers in sequence over calibration windows (S, T).

    hidden: the residual stream of every window, a list of chunks (B, T, H) in the compute dtype;
    each `layer` call quantizes one decoder layer and advances hidden through it."""

    def __init__(self, source: ModelSource, quant: QuantConfig, settings: CalibrationSettings,
                 windows: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.source, self.quant, self.settings = source, quant, settings
        self.device, self.dtype = device, dtype
        self.cfg = source.model_config
        self.scale_dtype = source.dtype()
        self.targets = quantized_linears(self.cfg, quant)
        s, t = windows.shape
        self.window_len = t
        batch = max(1, CHUNK_TOKENS // t)
        self.positions = torch.arange(t, device=device)
        rotary = Rotary(self.cfg).to(device)
        self.cos, self.sin = rotary(self.positions, dtype)
        emb = source.get_tensor("model.embed_tokens.weight").to(device, dtype)
        self.hidden = [emb[windows[b:b + batch].to(device)] for b in range(0, s, batch)]
        del emb
        self._one_layer = dataclasses.replace(self.cfg, num_layers=1)

    def _stats(self, k: int) -> InputStats:
        return InputStats(k, self.device, hessian=self.settings.method == "gptq")

    def _cache(self, batch: int) -> DenseKVCache:
        return DenseKVCache(self._one_layer, batch, self.window_len, self.dtype, self.device)

    def _quantize(self, prefix: str, module: nn.Linear, name: str, stats: InputStats,
                  w16: torch.Tensor) -> WeightFormat | None:
        """Quantize `module` (16-bit weight w16) if it is stored quantized; put the dequantized
        weight in place so later computation sees what inference will."""
        full = prefix + name
        if full not in self.targets:
            return None
        fmt = quantize_linear(w16.to(self.device), stats, self.quant.for_module(full),
                              self.settings, self.scale_dtype)
        module.weight.data.copy_(fmt.dequantize(self.dtype))
        return fmt

    def _weight16(self, index: int, name: str) -> torch.Tensor:
        """The source's 16-bit weight of layer `index`'s `name` (what conversion quantizes; the
        layer's own copy is in the compute dtype, which may round it, e.g. fp16 → bf16)."""
        return self.source.get_tensor(f"model.layers.{index}.{name}.weight").to(self.scale_dtype)

    @torch.inference_mode()
    def layer(self, index: int) -> Iterator[tuple[str, WeightFormat]]:
        """Quantize decoder layer `index`, yielding (module name, format) in file order."""
        layer = load_layer(self.source, index, self.device, self.dtype)
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{index}."
        out: list[tuple[str, WeightFormat]] = []

        def run(site_stats: InputStats, pairs):
            for name, module in pairs:
                fmt = self._quantize(prefix, module, name, site_stats,
                                     self._weight16(index, name))
                if fmt is not None:
                    out.append((prefix + name, fmt.to("cpu")))

        stats = self._stats(self.cfg.hidden_size)
        for h in self.hidden:
            stats.add(layer.input_layernorm(h))
        run(stats, [("self_attn.q_proj", attn.q_proj), ("self_attn.k_proj", attn.k_proj),
                    ("self_attn.v_proj", attn.v_proj)])

        stats, cores = self._stats(self.cfg.q_size), []
        with _without(attn, "o_proj"):
            for h in self.hidden:
                core = attn(layer.input_layernorm(h), self.cos, self.sin, self.positions,
                            self._cache(h.shape[0]), self.window_len)  # (B, T, H*D)
                stats.add(core)
                cores.append(core)
        run(stats, [("self_attn.o_proj", attn.o_proj)])

        stats = self._stats(self.cfg.hidden_size)
        for j, core in enumerate(cores):
            self.hidden[j] = self.hidden[j] + attn.o_proj(core)
            stats.add(layer.post_attention_layernorm(self.hidden[j]))
        del cores
        run(stats, [("mlp.gate_proj", mlp.gate_proj), ("mlp.up_proj", mlp.up_proj)])

        stats, acts = self._stats(self.cfg.intermediate_size), []
        with _without(mlp, "down_proj"):
            for h in self.hidden:
                act = mlp(layer.post_attention_layernorm(h))  # (B, T, I)
                stats.add(act)
                acts.append(act)
        run(stats, [("mlp.down_proj", mlp.down_proj)])
        for j, act in enumerate(acts):
            self.hidden[j] = self.hidden[j] + mlp.down_proj(act)
        del acts
        yield from out

    @torch.inference_mode()
    def lm_head(self) -> Iterator[tuple[str, WeightFormat]]:
        """The output projection (a tied model's is the embedding), from the final norm's output."""
        if "lm_head" not in self.targets:
            return
        norm = RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps).to(self.device, self.dtype)
        norm.weight.data.copy_(self.source.get_tensor("model.norm.weight").to(self.device))
        stats = self._stats(self.cfg.hidden_size)
        for h in self.hidden:
            stats.add(norm(h))
        name = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        w16 = self.source.get_tensor(name).to(self.scale_dtype).to(self.device)
        fmt = quantize_linear(w16, stats, self.quant.for_module("lm_head"), self.settings,
                              self.scale_dtype)
        yield "lm_head", fmt.to("cpu")


def calibrate(source: ModelSource, quant: QuantConfig, settings: CalibrationSettings,
              windows: torch.Tensor, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, progress: bool = True
              ) -> Iterator[tuple[str, WeightFormat]]:
    """Yield (module name, format) for every linear `quant` stores quantized, layer by layer in
    file order (the tied lm_head last), calibrated on `windows` (S, T) int64 token ids.

    The formats are the canonical ones RTN produces (same tensor names, dtypes and shapes): only
    the integers, scales and zero points differ. Scales take the source's 16-bit dtype, as
    `lowbit convert` stores them. Deterministic for the same inputs, device and thread count."""
    if quant.weight_bits == 16:
        raise QuantConfigError("16-bit weights need no calibration")
    device = torch.device(device)
    cal = LayerCalibrator(source, quant, settings, windows, device, dtype)
    n = cal.cfg.num_layers
    bar = Progress(n + 1, f"calibrating ({settings.method})", unit="layers", enabled=progress)
    for i in range(n):
        bar.update(0, f"layer {i + 1}/{n}")
        yield from cal.layer(i)
        bar.update(1, f"layer {i + 1}/{n}")
    bar.update(0, "lm_head")
    yield from cal.lm_head()
    bar.update(1, "lm_head")
    bar.close()


def calibration_record(settings: CalibrationSettings, text_record: dict,
                       device: torch.device | str) -> dict:
    """What QuantConfig.calibration stores: method, settings, text (file fingerprint, lines,
    tokens, seed) and device."""
    return {"method": settings.method, "settings": settings.to_dict(), "text": text_record,
            "seed": text_record.get("seed"), "device": str(device)}


def lazy_quantizer(formats: Iterator[tuple[str, WeightFormat]]):
    """A `quant.convert` Quantizer that takes each module's format from the calibration stream
    as conversion asks for it (both run in file order, so at most a few formats wait here)."""
    waiting: dict[str, WeightFormat] = {}

    def quantize(module: str, w: torch.Tensor) -> WeightFormat:
        while module not in waiting:
            try:
                name, fmt = next(formats)
            except StopIteration:
                raise QuantConfigError(f"calibration produced no weight for {module!r}") from None
            waiting[name] = fmt
        fmt = waiting.pop(module)
        if (fmt.out_features, fmt.in_features) != tuple(w.shape):
            raise QuantConfigError(f"{module}: calibrated weight is {fmt.out_features}x"
                                   f"{fmt.in_features}, the source's {tuple(w.shape)}")
        return fmt

    return quantize


def unweighted_search_quantizer(quant: QuantConfig):
    """The search without calibration: every input column equally important."""
    def quantize(module: str, w: torch.Tensor) -> WeightFormat:
        cfg = quant.for_module(module)
        return search_quantize(w, None, cfg.weight_bits, cfg.group_size, cfg.symmetric, w.dtype)
    return quantize


def convert_calibrated(src, out, quant: QuantConfig, settings: CalibrationSettings, *,
                       calib=None, calib_tokens: int | None = None, seed: int = 0,
                       device: str = "cpu", dtype: str = "auto", force: bool = False,
                       progress: bool = True):
    """`lowbit convert --method search|gptq`: choose calibration text (calibration_text), record
    it in quant.calibration, and stream the calibrated formats into the checkpoint writer.
    Without a --calib file and without the default corpus installed, "search" falls back to the
    unweighted search (and says so on stderr); "gptq" cannot. Returns quant.convert's
    ConvertSummary."""
    from lowbit.engine.load import resolve_device, resolve_dtype
    from lowbit.engine.tokenizer import Tokenizer
    from lowbit.quant.calibration_text import DEFAULT_TOKENS, DEFAULT_WINDOW, calibration_text
    from lowbit.quant.convert import convert
    from lowbit.quant.sources import open_source
    from lowbit.quant.text import TextError, default_text_path

    source = open_source(src)
    source.validate()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, source.dtype())
    if calib is None and settings.method == "search":
        try:
            default_text_path()
        except TextError as e:
            print(f"lowbit: no calibration text ({e}); using the unweighted search",
                  file=sys.stderr)
            quant = dataclasses.replace(quant, method="search",
                                        calibration={"method": "search", "text": None})
            return convert(source, out, quant, force=force, progress=progress,
                           quantizer=unweighted_search_quantizer(quant))
    tokenizer = Tokenizer.from_files(source.tokenizer_files())
    window = min(DEFAULT_WINDOW, source.model_config.max_position_embeddings)
    text = calibration_text(tokenizer, calib, n_tokens=calib_tokens or DEFAULT_TOKENS,
                            window_len=window, seed=seed)
    quant = dataclasses.replace(quant, method=settings.method,
                                calibration=calibration_record(settings, text.record, dev))
    formats = calibrate(source, quant, settings, text.windows, dev, dt, progress)
    return convert(source, out, quant, force=force, progress=False,
                   quantizer=lazy_quantizer(formats))
