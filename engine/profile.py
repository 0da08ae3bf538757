"""Per-phase roofline diagnosis: what prefill and decode must compute and move, what they achieved,
and which ceiling bounds them.

Counting rules (batch 1; the same rules the hand count in tests/engine/test_profile.py follows):
- FLOPs are matmul FLOPs, 2 per multiply-add: every linear layer (2·T·out·in), lm_head on the
  rows that need logits (prefill computes the last prompt row only), and attention's QKᵀ and PV,
  4·H·D per visible key per query (causal, so query i sees i + 1 keys; a sliding window caps it).
  Norms, RoPE, softmax and SiLU are left out: < 1% of the matmul FLOPs at real shapes.
- Bytes are the minimum traffic of one forward, as stored: every weight read once at its real
  width (scales, zero points, bias included), the embedding rows looked up, every RMSNorm weight;
  the KV cache written once for each new token and each visible cached position read once
  (what a fused attention kernel must stream); activations: each linear reads its input (T × in)
  and writes its output (T × out), attention reads Q and writes its output (T × H·D each), the
  embedding writes T × hidden, lm_head writes its logits.
- Decode is the steps after the first new token (which prefill's logits produce), as
  GenerationStats times it: step j processes position P + j and reads P + j + 1 cached positions.

A phase is compute-bound when its arithmetic intensity (FLOP/byte) sits above the device's ridge
point (matmul FLOP/s ÷ copy bytes/s), memory-bound below it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.engine.device_limits import DeviceLimits
from lowbit.quant.architecture import ModelConfig
from lowbit.quant.config import DEFAULT_KEEP_16BIT, QuantConfig

WEIGHT_KINDS = ("16", "int8", "int4", "bnb-nf4", "bnb-fp4", "bnb-int8")
BNB_BLOCKSIZE = 64          # QLoRA's 4-bit block
BNB_NESTED_BLOCKSIZE = 256  # double quantization: one fp32 absmax per 256 block absmaxes
BNB_CODE_BYTES = 16 * 4     # the fp32 16-entry NF4/FP4 code table stored with each layer
BNB_NESTED_CODE_BYTES = 256 * 4 + 4  # the fp32 256-entry code of the nested absmax + its offset


class ProfileError(ValueError):
    """Inputs the profile cannot count (unknown weight format, negative token counts, ...)."""


def linear_format_bytes(weights: str, out_f: int, in_f: int, dtype_bytes: int,
                        group_size: int | None = None, symmetric: bool = False,
                        double_quant: bool = True) -> int:
    """Bytes one (out_f × in_f) weight occupies as stored in `weights` (bias not included).

    16: dtype_bytes each. int8: 1 byte each + one 16-bit scale per group (or per row).
    int4: ½ byte each + a scale per group + a uint8 zero point per group when asymmetric.
    bnb-nf4/fp4: ½ byte each + per 64-block absmax (uint8 with double quantization, plus one fp32
    per 256 blocks and the nested code; fp32 without) + the 16-entry code.
    bnb-int8: 1 byte each + one fp32 scale per row (LLM.int8's SCB).
    """
    n = out_f * in_f
    if weights == "16":
        return n * dtype_bytes
    if weights in ("int8", "int4"):
        groups = 1 if group_size is None else math.ceil(in_f / group_size)
        if weights == "int8":
            return n + out_f * groups * dtype_bytes
        zeros = 0 if symmetric else out_f * groups
        return math.ceil(n / 2) + out_f * groups * dtype_bytes + zeros
    if weights in ("bnb-nf4", "bnb-fp4"):
        blocks = math.ceil(n / BNB_BLOCKSIZE)
        if double_quant:
            absmax = blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + BNB_NESTED_CODE_BYTES
        else:
            absmax = 4 * blocks
        return math.ceil(n / 2) + absmax + BNB_CODE_BYTES
    if weights == "bnb-int8":
        return n + 4 * out_f
    raise ProfileError(f"unknown weight format {weights!r}; known: {', '.join(WEIGHT_KINDS)}")


@dataclass(frozen=True)
class WeightLayout:
    """What the weights occupy as stored: the bytes a forward pass must read."""

    name: str                    # "16 (float32)", "int4-g128-asym", "bnb-nf4", ...
    linear_bytes: dict           # linear module name (lm_head included) → bytes with its bias
    embedding_row_bytes: int     # one row of the embedding table, read per token looked up
    norm_bytes: int              # every RMSNorm weight together

    def layer_linear_bytes(self) -> int:
        return sum(b for name, b in self.linear_bytes.items() if name != "lm_head")

    @property
    def total_linear_bytes(self) -> int:
        return sum(self.linear_bytes.values())

    @property
    def decode_weight_bytes(self) -> int:
        """What one decode token reads from the weights: every linear (lm_head included), the
        norms, and one embedding row."""
        return self.total_linear_bytes + self.norm_bytes + self.embedding_row_bytes


def analytic_layout(cfg: ModelConfig, weights: str, dtype_bytes: int,
                    group_size: int | None = None, symmetric: bool = False,
                    keep_16bit: tuple[str, ...] = DEFAULT_KEEP_16BIT,
                    double_quant: bool = True,
                    quantize_tied_lm_head: bool = False) -> WeightLayout:
    """The layout `weights` gives `cfg`, counted from the format rules of linear_format_bytes.
    Which layers stay 16-bit follows QuantConfig.stays_16bit: a tied lm_head reads the 16-bit
    embedding table unless quantize_tied_lm_head (then it is a quantized copy, like any linear)."""
    rules = QuantConfig(weight_bits=16, keep_16bit=keep_16bit,
                        quantize_tied_lm_head=quantize_tied_lm_head)
    shapes = dict(cfg.linear_shapes())
    if cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, cfg.hidden_size)
    per_linear = {}
    for name, (out_f, in_f) in shapes.items():
        fmt = "16" if rules.stays_16bit(name, cfg.tie_word_embeddings) else weights
        per_linear[name] = linear_format_bytes(fmt, out_f, in_f, dtype_bytes, group_size,
                                               symmetric, double_quant)
        if cfg.has_bias(name):
            per_linear[name] += out_f * dtype_bytes
    label = weights if weights != "16" else f"16 ({dtype_bytes * 8}-bit)"
    return WeightLayout(label, per_linear, cfg.hidden_size * dtype_bytes,
                        (2 * cfg.num_layers + 1) * cfg.hidden_size * dtype_bytes)


def _stored_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: QuantizedLinear and the bitsandbytes linears keep every stored
    tensor (packed weights, scales, zero points, quant state) as one or the other."""
    return list(module.parameters()) + list(module.buffers())


def _unique_nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


FUSED = {"q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
         "up_proj": ("gate_up_proj", ("gate_proj", "up_proj"))}


def _linear_nbytes(modules: dict, name: str, cfg: ModelConfig) -> int:
    """Bytes of linear `name`; for one fused into qkv_proj / gate_up_proj (engine/fuse.py), its
    rows' share of the fused module: every output row stores the same bytes (same K, groups)."""
    if name in modules:
        return _unique_nbytes(_stored_tensors(modules[name]))
    parent, _, leaf = name.rpartition(".")
    fused, members = FUSED[leaf]
    shapes = cfg.linear_shapes()
    rows = {m: shapes[f"{parent}.{m}"][0] for m in members}
    total = _unique_nbytes(_stored_tensors(modules[f"{parent}.{fused}"]))
    return total * rows[leaf] // sum(rows.values())


def model_layout(model: torch.nn.Module, name: str) -> WeightLayout:
    """The layout a loaded Transformer really has, read from its modules' stored tensors."""
    cfg = model.config
    modules = dict(model.named_modules())
    per_linear = {n: _linear_nbytes(modules, n, cfg) for n in cfg.linear_shapes()}
    per_linear["lm_head"] = _unique_nbytes(_stored_tensors(modules["lm_head"]))
    embed = model.model.embed_tokens.weight
    norms = [m.weight for n, m in modules.items() if n.endswith("norm")]
    return WeightLayout(name, per_linear, embed.shape[1] * embed.element_size(),
                        _unique_nbytes(norms))


@dataclass(frozen=True)
class PhaseCost:
    """What one phase must compute and move; bytes split by what they are."""

    phase: str
    tokens: int               # prompt tokens (prefill) or decode steps (decode)
    flops: float
    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float
    activation_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0


def _visible_keys(position: int, window: int | None) -> int:
    return position + 1 if window is None else min(position + 1, window)


def forward_cost(cfg: ModelConfig, layout: WeightLayout, start: int, tokens: int,
                 logit_rows: int, kv_bytes_per_token: int, act_bytes: int) -> PhaseCost:
    """One forward of `tokens` new positions [start, start + tokens) over a cache holding
    [0, start), with lm_head applied to `logit_rows` of them."""
    hq_d = cfg.num_heads * cfg.head_dim
    shapes = cfg.linear_shapes()
    layer_shapes = [s for n, s in shapes.items() if n != "lm_head"]
    layer_macs = sum(o * i for o, i in layer_shapes)
    keys = sum(_visible_keys(p, cfg.sliding_window) for p in range(start, start + tokens))
    flops = (2 * tokens * layer_macs + 2 * logit_rows * cfg.vocab_size * cfg.hidden_size
             + 4 * cfg.num_layers * hq_d * keys)
    end = start + tokens
    read_from = 0 if cfg.sliding_window is None else max(0, start - cfg.sliding_window + 1)
    weights = (layout.layer_linear_bytes() + layout.linear_bytes["lm_head"] + layout.norm_bytes
               + tokens * layout.embedding_row_bytes)
    activations = act_bytes * (
        tokens * cfg.hidden_size                                   # embedding output
        + tokens * sum(o + i for o, i in layer_shapes)             # linear inputs and outputs
        + cfg.num_layers * 2 * tokens * hq_d                       # attention: Q in, output out
        + logit_rows * (cfg.hidden_size + cfg.vocab_size))         # lm_head input and logits
    return PhaseCost("forward", tokens, flops, weights, (end - read_from) * kv_bytes_per_token,
                     tokens * kv_bytes_per_token, activations)


def _sum(phase: str, tokens: int, costs: list[PhaseCost]) -> PhaseCost:
    return PhaseCost(phase, tokens, *(sum(getattr(c, f) for c in costs) for f in
                                      ("flops", "weight_bytes", "kv_read_bytes", "kv_write_bytes",
                                       "activation_bytes")))


def phase_costs(cfg: ModelConfig, layout: WeightLayout, prompt_tokens: int, new_tokens: int,
                kv_bytes_per_token: int, act_bytes: int) -> tuple[PhaseCost, PhaseCost]:
    """(prefill, decode) for a prompt of `prompt_tokens` and `new_tokens` generated tokens."""
    if prompt_tokens < 1 or new_tokens < 0:
        raise ProfileError(f"need ≥ 1 prompt token and ≥ 0 new tokens, got {prompt_tokens} "
                           f"and {new_tokens}")
    prefill = forward_cost(cfg, layout, 0, prompt_tokens, 1, kv_bytes_per_token, act_bytes)
    steps = max(new_tokens - 1, 0)
    decode = [forward_cost(cfg, layout, prompt_tokens + j, 1, 1, kv_bytes_per_token, act_bytes)
              for j in range(steps)]
    return (_sum("prefill", prompt_tokens, [prefill]), _sum("decode", steps, decode))


def verdict(intensity: float, limits: DeviceLimits) -> str:
    return "compute-bound" if intensity >= limits.ridge else "memory-bound"


def _phase_dict(cost: PhaseCost, seconds: float, wall: float, limits: DeviceLimits) -> dict:
    d = {"tokens": cost.tokens, "seconds": seconds, "share": seconds / wall if wall else 0.0,
         "flops": cost.flops, "bytes": cost.bytes, "bytes_weights": cost.weight_bytes,
         "bytes_kv_read": cost.kv_read_bytes, "bytes_kv_written": cost.kv_write_bytes,
         "bytes_activations": cost.activation_bytes, "intensity": cost.intensity}
    if cost.tokens == 0 or seconds <= 0:
        return {**d, "verdict": None}
    flops_s, bytes_s = cost.flops / seconds, cost.bytes / seconds
    roofline_s = max(cost.flops / limits.matmul_flops_per_s, cost.bytes / limits.copy_bytes_per_s)
    return {**d, "tok_s": cost.tokens / seconds, "bytes_per_token": cost.bytes / cost.tokens,
            "flops_per_s": flops_s, "bytes_per_s": bytes_s,
            "frac_matmul": flops_s / limits.matmul_flops_per_s,
            "frac_copy": bytes_s / limits.copy_bytes_per_s,
            "roofline_s": roofline_s, "frac_roofline": roofline_s / seconds,
            "verdict": verdict(cost.intensity, limits)}


def phase_report(cfg: ModelConfig, layout: WeightLayout, *, prompt_tokens: int, new_tokens: int,
                 prefill_s: float, decode_s: float, kv_bytes_per_token: int, kv_bits: int,
                 act_bytes: int, limits: DeviceLimits) -> dict:
    """The diagnosis as a JSON-ready dict: {"device": limits, "weights", "kv_bits",
    "prefill": {...}, "decode": {...}}, each phase with tokens, seconds, share of wall time,
    flops, bytes (and their split), intensity, achieved flops_per_s / bytes_per_s, their
    fractions of the limits, the roofline time and the verdict (None when the phase did not run).
    Wall time here is prefill + decode seconds."""
    prefill, decode = phase_costs(cfg, layout, prompt_tokens, new_tokens, kv_bytes_per_token,
                                  act_bytes)
    wall = prefill_s + decode_s
    return {"device": limits.to_dict(), "weights": layout.name, "kv_bits": kv_bits,
            "weight_bytes": layout.total_linear_bytes,
            "prefill": _phase_dict(prefill, prefill_s, wall, limits),
            "decode": _phase_dict(decode, decode_s, wall, limits)}


def generation_phase_report(model: torch.nn.Module, stats, limits: DeviceLimits,
                            weights_name: str) -> dict:
    """phase_report for a finished Generation: its model's real weight layout, its stats."""
    return phase_report(
        model.config, model_layout(model, weights_name), prompt_tokens=stats.prompt_tokens,
        new_tokens=stats.new_tokens, prefill_s=stats.prefill_s, decode_s=stats.decode_s,
        kv_bytes_per_token=stats.kv_bytes_per_token, kv_bits=stats.kv_bits,
        act_bytes=next(model.parameters()).element_size(), limits=limits)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _phase_lines(name: str, p: dict) -> list[str]:
    unit = "tokens" if name == "prefill" else "steps"
    head = (f"{name:<8} {p['tokens']} {unit} · {p['seconds'] * 1e3:,.1f} ms "
            f"({p['share']:.0%} of wall) · {_si(p['flops'], 'FLOP')}, {_si(p['bytes'], 'B')} "
            f"(weights {_si(p['bytes_weights'], 'B')}, KV read {_si(p['bytes_kv_read'], 'B')} "
            f"written {_si(p['bytes_kv_written'], 'B')}, activations "
            f"{_si(p['bytes_activations'], 'B')}) · {p['intensity']:,.1f} FLOP/B")
    if p["verdict"] is None:
        return [head, " " * 9 + "did not run"]
    per_token = f"{_si(p['bytes_per_token'], 'B')}/token, " if name == "decode" else ""
    body = (f"{' ' * 9}→ {p['verdict']}: {per_token}{_si(p['flops_per_s'], 'FLOP/s')} = "
            f"{p['frac_matmul']:.0%} of matmul, {_si(p['bytes_per_s'], 'B/s')} = "
            f"{p['frac_copy']:.0%} of copy; at {p['frac_roofline']:.0%} of its roofline")
    return [head, body]


def format_phase_report(report: dict) -> str:
    """The diagnosis as a few human-readable lines."""
    limits = DeviceLimits.from_dict(report["device"])
    lines = [f"roofline {limits.describe()}"]
    lines += _phase_lines("prefill", report["prefill"])
    lines += _phase_lines("decode", report["decode"])
    return "\n".join(lines)


def _bound_cell(p: dict) -> str:
    """'memory-bound 2.45 GB/s = 13% of copy' (the rate against the ceiling that binds)."""
    if p["verdict"] is None:
        return "did not run"
    if p["verdict"] == "compute-bound":
        return f"compute-bound {_si(p['flops_per_s'], 'FLOP/s')} = {p['frac_matmul']:.0%} of matmul"
    return f"memory-bound {_si(p['bytes_per_s'], 'B/s')} = {p['frac_copy']:.0%} of copy"


def format_phase_table(rows: list[dict]) -> str:
    """One line per variant (rows of `lowbit compare --json`, each with "name" and "phases"):
    intensity, verdict and the binding rate of each phase, and decode's share of wall time."""
    rows = [r for r in rows if r.get("phases")]
    if not rows:
        return ""
    limits = DeviceLimits.from_dict(rows[0]["phases"]["device"])
    heads = ["variant", "prefill FLOP/B", "prefill", "decode FLOP/B", "decode", "decode share"]
    body = [[r["name"], f"{r['phases']['prefill']['intensity']:,.1f}",
             _bound_cell(r["phases"]["prefill"]), f"{r['phases']['decode']['intensity']:,.1f}",
             _bound_cell(r["phases"]["decode"]), f"{r['phases']['decode']['share']:.0%}"]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = [f"roofline {limits.describe()}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
              for cells in [heads, *body]]
    return "\n".join(lines)
