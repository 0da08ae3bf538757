"""Sensitivity: how much each quantized linear (or each decoder layer, or each kind of projection
across layers) alone costs the model's output, so the worst can be kept at 8 bits
(`--keep-8bit PATTERN`), and what that buys in KL per bit.

For every unit the model is run with ONLY that unit's weights replaced by their quantized
versions, and the mean per-token KL(P_16bit || P) of the next-token distributions is measured on a
sample of windows. The reference pass stores each decoder layer's input, so a run for a unit
starting in layer i starts at layer i (on average half a forward per linear). Beside it, the
layer-local relative output error ‖ΔW x‖² / ‖W x‖² over the same sample is reported (free: one
matmul a linear during the reference pass); it ranks layers without the model but ignores how an
error propagates to the logits, which is why the KL is the column to decide on.

The bits/KL trade-off: keeping the k most sensitive units at per-channel int8 costs their extra
bits (exact, from the formats) and removes, to first order, their KL (estimated as the
all-quantized KL minus the kept units' own KL; on the default model per-channel int8 RTN costs KL
0.004 where int4 g128 RTN costs 0.56, so int8's own error is left out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.engine.evaluate import kl_per_token
from lowbit.engine.kv_cache import DenseKVCache
from lowbit.engine.model import Transformer
from lowbit.quant.config import QuantConfig
from lowbit.quant.formats import Int4Weight, Int8Weight
from lowbit.quant.progress import Progress
from lowbit.quant.sources import open_source

WeightFormat = Int4Weight | Int8Weight


@dataclass(frozen=True)
class LinearSensitivity:
    name: str
    kl: float  # mean KL (nats/token) with only this linear quantized
    rel_error: float  # ‖ΔW x‖² / ‖W x‖² over the sample's inputs to this linear
    weights: int  # N × K
    bits: float  # stored bits per weight as quantized
    bits_int8: float  # stored bits per weight as per-channel int8


@dataclass(frozen=True)
class SensitivityReport:
    layers: list[LinearSensitivity]  # most sensitive first
    kl_all: float  # mean KL with every linear quantized
    tokens: int  # scored positions

    def trade_off(self, ks=(0, 1, 2, 4, 8, 16, 32)) -> list[dict]:
        """Rows {"keep_8bit": k, "bits_per_weight", "kl_estimate", "names"} for keeping the k
        most sensitive linears at int8."""
        total_w = sum(s.weights for s in self.layers)
        rows = []
        for k in ks:
            if k > len(self.layers):
                break
            kept, rest = self.layers[:k], self.layers[k:]
            bits = (sum(s.bits_int8 * s.weights for s in kept)
                    + sum(s.bits * s.weights for s in rest)) / total_w
            kl = max(self.kl_all - sum(s.kl for s in kept), 0.0)
            rows.append({"keep_8bit": k, "bits_per_weight": bits, "kl_estimate": kl,
                         "names": [s.name for s in kept]})
        return rows


def _bits(fmt: WeightFormat) -> float:
    return 8 * fmt.nbytes / (fmt.out_features * fmt.in_features)


def _int8_bits(fmt: WeightFormat, scale_bytes: int) -> float:
    """Per-channel int8: one byte a weight and one scale a row."""
    return 8 + 8 * scale_bytes / fmt.in_features


class _Runner:
    """Runs a Transformer from any decoder layer onward over fixed windows (S, T)."""

    def __init__(self, model: Transformer, windows: torch.Tensor):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        s, t = windows.shape
        self.t = t
        self.positions = torch.arange(t, device=self.device)
        self.cos, self.sin = model.rotary(self.positions, self.dtype)
        self.cache = DenseKVCache(model.config, s, t, self.dtype, self.device)
        self.windows = windows.to(self.device)

    def layer_inputs(self) -> list[torch.Tensor]:
        """Input of every decoder layer, then the final hidden state (before the norm)."""
        x = self.model.model.embed_tokens(self.windows)  # (S, T, H)
        out = [x]
        for layer in self.model.model.layers:
            x = layer(x, self.cos, self.sin, self.positions, self.cache, self.t)
            out.append(x)
        return out

    def log_probs(self, x: torch.Tensor, start: int, head: torch.Tensor) -> torch.Tensor:
        """Layers start.. on x, final norm, head (V, H) → fp32 log-probs (S*(T-1), V)."""
        for layer in self.model.model.layers[start:]:
            x = layer(x, self.cos, self.sin, self.positions, self.cache, self.t)
        logits = F.linear(self.model.model.norm(x)[:, :-1], head.to(x.dtype))  # (S, T-1, V)
        return torch.log_softmax(logits.float(), -1).flatten(0, 1)


def _relative_errors(model: Transformer, formats: dict[str, WeightFormat], run) -> dict:
    """‖ΔW x‖² / ‖W x‖² per linear, from forward pre-hooks during `run()`."""
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in formats}
    modules = dict(model.named_modules())
    handles = []
    for name, fmt in formats.items():
        if name == "lm_head":
            continue

        def hook(module, args, name=name, fmt=fmt):
            x = args[0].reshape(-1, args[0].shape[-1])  # (tokens, K)
            w = module.weight
            delta = w - fmt.dequantize(w.dtype).to(w.device)
            sums[name][0] += float(F.linear(x, delta).float().square().sum())
            sums[name][1] += float(F.linear(x, w).float().square().sum())

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return out, sums


GRANULARITIES = ("linear", "layer", "type")


def units(names: list[str], granularity: str) -> dict[str, list[str]]:
    """Group linear names into what is measured (and kept at int8) together, keyed by the
    --keep-8bit pattern that names the group: each linear alone ("linear"), every linear of a
    decoder layer ("layer": model.layers.3.*), or one projection in every layer ("type":
    *.mlp.down_proj)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    out: dict[str, list[str]] = {}
    for name in names:
        if granularity == "linear" or name == "lm_head":
            key = name
        elif granularity == "layer":
            key = ".".join(name.split(".")[:3]) + ".*"
        else:
            key = "*." + ".".join(name.split(".")[3:])
        out.setdefault(key, []).append(name)
    return out


@torch.inference_mode()
def sensitivity(model: Transformer, formats: dict[str, WeightFormat], windows: torch.Tensor,
                granularity: str = "linear", progress=None) -> SensitivityReport:
    """The KL each unit of `formats` (see `units`) causes alone, on windows (S, T) of token ids.

    `model` is the 16-bit model (plain, unfused nn.Linear; a tied lm_head reads the embedding);
    `formats` maps module names (as `calibrate` or a checkpoint give them) to their quantized
    weights. The model is left as it was. `progress(i, n, name)` is called before each unit."""
    runner = _Runner(model, windows)
    head = model.lm_head.weight
    n_layers = len(model.model.layers)
    inputs, sums = _relative_errors(model, formats, runner.layer_inputs)
    x_head = model.model.norm(inputs[-1]).reshape(-1, head.shape[1])
    if "lm_head" in formats:
        w_hat = formats["lm_head"].dequantize(runner.dtype).to(runner.device)
        sums["lm_head"] = [float(F.linear(x_head, head - w_hat).square().sum()),
                           float(F.linear(x_head, head).square().sum())]
    ref = runner.log_probs(inputs[-1], n_layers, head)
    modules = dict(model.named_modules())
    scale_bytes = head.element_size()

    def kl_with(names: list[str]) -> float:
        """KL with the linears `names` quantized (and nothing else)."""
        start = min((int(n.split(".")[2]) for n in names if n != "lm_head"), default=n_layers)
        kept = {}
        try:
            for n in names:
                if n != "lm_head":
                    kept[n] = modules[n].weight.data.clone()
                    modules[n].weight.data.copy_(
                        formats[n].dequantize(runner.dtype).to(runner.device))
            w_head = formats["lm_head"].dequantize(runner.dtype).to(runner.device) \
                if "lm_head" in names else head
            return float(kl_per_token(ref, runner.log_probs(inputs[start], start, w_head)).mean())
        finally:
            for n, w in kept.items():
                modules[n].weight.data.copy_(w)

    groups = units(list(formats), granularity)
    results = []
    for i, (key, names) in enumerate(groups.items()):
        if progress is not None:
            progress(i, len(groups), key)
        weights = sum(formats[n].out_features * formats[n].in_features for n in names)
        num = sum(sums[n][0] for n in names)
        den = sum(sums[n][1] for n in names)

        def mean(f):
            return sum(f(formats[n]) * formats[n].out_features * formats[n].in_features
                       for n in names) / weights

        results.append(LinearSensitivity(key, kl_with(names), num / den if den else 0.0, weights,
                                         mean(_bits), mean(lambda f: _int8_bits(f, scale_bytes))))
    kl_all = kl_with(list(formats))
    results.sort(key=lambda s: s.kl, reverse=True)
    return SensitivityReport(results, kl_all, ref.shape[0])


def measure(model_path, quant: QuantConfig, method: str = "rtn", *, calib=None,
            calib_tokens: int | None = None, n_windows: int = 2, window_len: int = 512,
            seed: int = 0, device: str = "auto", dtype: str = "auto", checkpoint=None,
            granularity: str = "linear", progress: bool = True) -> SensitivityReport:
    """`lowbit sensitivity`: quantize every linear of `model_path` as `quant` and `method` say
    (rtn, or search/gptq calibrated layer by layer) or take them from a lowbit `checkpoint`
    (then the model is its recorded source), and measure each one's KL alone on
    n_windows × window_len tokens of calibration text (never compare's evaluation windows)."""
    from lowbit.engine.calibrate import CalibrationSettings, calibrate
    from lowbit.engine.load import load_model
    from lowbit.quant.calibration_text import DEFAULT_TOKENS, DEFAULT_WINDOW, calibration_text
    from lowbit.quant.checkpoint import quantized_linears, read_checkpoint
    from lowbit.quant.quantize import quantize_weight

    ckpt = None
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
        model_path = ckpt.source["path"]
    loaded = load_model(model_path, device=device, dtype=dtype, fuse=False)  # hooks per linear
    source = open_source(model_path)
    mc = source.model_config
    window_len = min(window_len, mc.max_position_embeddings)
    # a different seed from calibration's, so the measurement is not the calibration text
    sample = calibration_text(loaded.tokenizer, calib, n_tokens=n_windows * window_len,
                              window_len=window_len, seed=seed + 1).windows
    if ckpt is not None:
        formats = {m: ckpt.linear_format(m) for m in ckpt.quantized_linears()}
    elif method == "rtn":
        formats = {}
        for name in quantized_linears(mc, quant):
            tensor = "model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"
            w = source.get_tensor(tensor).to(source.dtype())
            formats[name] = quantize_weight(w, quant.for_module(name))
    else:
        window = min(DEFAULT_WINDOW, mc.max_position_embeddings)
        text = calibration_text(loaded.tokenizer, calib, n_tokens=calib_tokens or DEFAULT_TOKENS,
                                window_len=window, seed=seed)
        formats = dict(calibrate(source, quant, CalibrationSettings(method), text.windows,
                                 loaded.device, loaded.dtype, progress))
    bar = Progress(len(units(list(formats), granularity)), "sensitivity", unit=granularity + "s",
                   enabled=progress)
    report = sensitivity(loaded.model, formats, sample, granularity,
                         progress=lambda i, n, name: bar.update(1 if i else 0, name))
    bar.update(1)
    bar.close()
    return report
