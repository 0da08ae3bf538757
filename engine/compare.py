"""Run a 16-bit reference and quantized variants on the same text and collect, per variant,
accuracy (perplexity, KL, top-1 against the reference) and cost (bits, bytes, speed, memory).
A variant's weights are either quantized here from the reference (round to nearest) or read
from a lowbit checkpoint converted from it (any method, calibrated ones included; see
compare_checkpoints.py for how the source is checked and calibration overlap flagged).

Every distinct weight setting is loaded once and stays loaded (a KV setting needs no model of its
own). Accuracy then runs window by window: the reference's forward runs once per window and every
variant's forward is scored against it while both log-prob tensors are in memory. The
alternatives cost more: keeping the reference's full distributions for all windows takes
8 × 1023 × 49152 fp32 = 1.6 GB on the default model, and loading one variant at a time means
either that or a second reference forward per window per weight setting; the models are small
next to that (135M params: 540 MB fp32 for 16-bit, less quantized).

Peak memory is measured per generation as this model's weight bytes plus what the run added on
top of what was in use just before it (KV cache, activations), so the other resident models do
not count: CUDA from the allocator's counters, CPU (Linux) from the process's resident set, whose
high-water mark is reset through /proc/self/clear_refs before each run.
"""
from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from lowbit.engine.compare_checkpoints import (calibration_overlap, check_source,
                                               open_checkpoint)
from lowbit.engine.evaluate import (EvaluationError, Tally, Windows, bits_per_weight,
                                    check_window_fits, next_token_log_probs, split_windows)
from lowbit.engine.device_limits import DeviceLimits
from lowbit.engine.generate import Generation
from lowbit.engine.load import LoadedModel, load_model
from lowbit.engine.profile import generation_phase_report
from lowbit.quant.config import DEFAULT_KEEP_16BIT, QuantConfig
from lowbit.quant.sources import is_lowbit_checkpoint, open_source

PROMPT_TOKENS = 128  # the speed prompt: the text's first tokens
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Variant:
    """One (weights, KV) setting. quant None = the weights as stored (16-bit). With
    `checkpoint`, the weights are that lowbit checkpoint's and `quant` is its QuantConfig (as
    lowbit.json records it, calibration included); else `quant` is applied here."""

    quant: QuantConfig | None
    kv_bits: int = 16
    checkpoint: str | None = None

    @property
    def weights(self) -> str:
        """The quant name, plus the modules kept 16-bit beyond the default (embeddings); for a
        checkpoint, its directory name first and its method last."""
        if self.quant is None:
            return "16"
        extra = [p for p in self.quant.keep_16bit if p not in DEFAULT_KEEP_16BIT]
        name = self.quant.name + (f" keep:{','.join(extra)}" if extra else "")
        if self.checkpoint is None:
            return name
        method = "" if self.quant.method == self.quant.name else f" {self.quant.method}"  # bnb-*
        return f"{Path(self.checkpoint).name}: {name}{method}"

    @property
    def weights_id(self) -> tuple:
        """What loading these weights depends on: variants equal here share one model."""
        return self.quant, self.checkpoint

    @property
    def name(self) -> str:
        return f"{self.weights} kv{self.kv_bits}"


REFERENCE = Variant(None, 16)


def checkpoint_variants(paths: list[str], kv_bits: list[int]) -> list[Variant]:
    """One variant per (checkpoint, KV bits), in the order given; each checkpoint is validated
    here, before any model loads (EvaluationError / CheckpointError name the bad one)."""
    variants = []
    for path in dict.fromkeys(paths):
        ckpt = open_checkpoint(path)
        variants += [Variant(ckpt.quant, bits, str(ckpt.path)) for bits in kv_bits]
    return variants


@dataclass
class Row:
    """One line of the comparison; `to_dict` gives its JSON object."""

    variant: Variant
    ppl: float = float("nan")
    ppl_delta_pct: float = 0.0
    kl_mean: float = 0.0
    top1_agreement: float = 100.0
    bits_per_weight: float = 16.0
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    peak_mem_bytes: int | None = None  # None where the platform has no resettable peak
    phases: dict | None = None  # profile.phase_report of the speed run (None: no device limits)
    speed_dtype: str = ""  # the dtype the speed run used (the device's fastest for these weights)
    calibration_overlap: str | None = None  # why a checkpoint's calibration may flatter it

    def to_dict(self) -> dict:
        return {"name": self.variant.name, "weights": self.variant.weights,
                "kv": self.variant.kv_bits, "ppl": self.ppl, "ppl_delta_pct": self.ppl_delta_pct,
                "kl_mean": self.kl_mean, "top1_agreement": self.top1_agreement,
                "bits_per_weight": self.bits_per_weight, "weight_bytes": self.weight_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                "peak_mem_bytes": self.peak_mem_bytes, "phases": self.phases,
                "speed_dtype": self.speed_dtype, "checkpoint": self.variant.checkpoint,
                "method": None if self.variant.quant is None else self.variant.quant.method,
                "calibration_overlap": self.calibration_overlap}


@dataclass
class Comparison:
    reference: Row
    variants: list[Row]
    model: str
    device: str
    dtype: str
    text: str
    windows: Windows
    prompt_tokens: int
    gen_tokens: int

    def to_dict(self) -> dict:
        w = self.windows
        return {"reference": self.reference.to_dict(),
                "variants": [r.to_dict() for r in self.variants],
                "model": self.model, "device": self.device, "dtype": self.dtype,
                "text": self.text, "windows": len(w), "windows_requested": w.requested,
                "window_len": int(w.tokens.shape[1]), "token_ranges": [list(r) for r in w.ranges],
                "prompt_tokens": self.prompt_tokens, "gen_tokens": self.gen_tokens,
                "commit": source_commit(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def source_commit() -> str | None:
    """git HEAD of the lowbit checkout this code runs from; None when it is not a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


class RunMemory:
    """Bytes a run adds on top of what was in use when it started (see the module docstring)."""

    CLEAR_REFS = Path("/proc/self/clear_refs")
    STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device):
        self.device = device
        self.base: int | None = None

    def _proc_kib(self, field: str) -> int:
        return int(re.search(rf"^{field}:\s+(\d+) kB", self.STATUS.read_text(), re.M).group(1))

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            self.CLEAR_REFS.write_text("5")  # "5": reset the peak RSS to the current RSS
            self.base = 1024 * self._proc_kib("VmRSS")
        except (OSError, AttributeError):
            self.base = None

    def added(self) -> int | None:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return 1024 * self._proc_kib("VmHWM") - self.base


def _generate(model, prompt: list[int], kv_bits: int, gen_tokens: int) -> Generation:
    """Greedy, exactly gen_tokens new tokens (no EOS stop: every variant decodes as many steps)."""
    gen = Generation(model, prompt, max_new_tokens=gen_tokens, kv_bits=kv_bits)
    for _ in gen:
        pass
    return gen


def measure_speed(loaded: LoadedModel, variant: Variant, prompt: list[int], gen_tokens: int,
                  row: Row, limits: DeviceLimits | None = None) -> None:
    """Fill the speed, bytes and memory fields of `row`: one warm-up generation (first calls
    pay for kernel compilation and allocator growth), then one measured; with `limits`, also
    its per-phase roofline diagnosis."""
    _generate(loaded.model, prompt, variant.kv_bits, gen_tokens)
    memory = RunMemory(loaded.device)
    memory.start()
    st = _generate(loaded.model, prompt, variant.kv_bits, gen_tokens).stats
    added = memory.added()
    row.bits_per_weight = bits_per_weight(loaded.model)
    row.weight_bytes, row.kv_bytes_per_token = st.weight_bytes, st.kv_bytes_per_token
    row.prefill_tok_s, row.decode_tok_s = st.prefill_tok_s, st.decode_tok_s
    row.speed_dtype = DTYPE_NAMES[loaded.dtype]
    row.peak_mem_bytes = None if added is None else st.weight_bytes + max(added, 0)
    if limits is not None:
        row.phases = generation_phase_report(loaded.model, st, limits, variant.weights)


def measure_accuracy(models: dict[tuple, LoadedModel], variants: list[Variant], windows: Windows,
                     rows: dict[Variant, Row], log: Callable[[str], None]) -> None:
    """Fill ppl, Δppl, KL and top-1 of `rows`, the reference's row included."""
    tallies = {v: Tally() for v in [REFERENCE, *variants]}
    ref_model = models[REFERENCE.weights_id].model
    for i, window in enumerate(windows.tokens):
        t0 = time.perf_counter()
        targets = window[1:]
        ref = next_token_log_probs(ref_model, window, REFERENCE.kv_bits)  # (L - 1, V)
        tallies[REFERENCE].add(ref, ref, targets)
        for v in variants:
            other = next_token_log_probs(models[v.weights_id].model, window, v.kv_bits)
            tallies[v].add(ref, other, targets)
            del other
        log(f"accuracy: window {i + 1}/{len(windows)} (reference + {len(variants)} variants) "
            f"{time.perf_counter() - t0:.1f} s")
    ref_ppl = tallies[REFERENCE].perplexity
    for v, tally in tallies.items():
        row = rows[v]
        row.ppl, row.kl_mean = tally.perplexity, tally.kl_mean
        row.top1_agreement = tally.top1_agreement
        row.ppl_delta_pct = 100.0 * (tally.perplexity / ref_ppl - 1.0)


def load_variant(path, variant: Variant, device: str, dtype: str) -> LoadedModel:
    """`variant`'s weights: its checkpoint, or the model at `path` quantized as it says."""
    if variant.checkpoint is not None:
        return load_model(variant.checkpoint, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype, quant=variant.quant)


def speed_model(path, accuracy_model: LoadedModel, variant: Variant, dtype: str,
                log: Callable[[str], None]) -> LoadedModel:
    """The model whose speed is reported: the accuracy model itself, unless the run's dtype was
    left to "auto" and the device runs these weights faster in another dtype (CPU: quantized
    weights run torch's packed kernels in bf16, where fp32 would dequantize every call), in
    which case the variant is loaded once more in that dtype."""
    if dtype != "auto" or variant.quant is None:
        return accuracy_model
    fast = load_variant(path, variant, str(accuracy_model.device), "auto")
    if fast.dtype == accuracy_model.dtype:
        return accuracy_model
    log(f"speed of {variant.weights} measured in {DTYPE_NAMES[fast.dtype]} (its fastest dtype "
        f"here); accuracy in {DTYPE_NAMES[accuracy_model.dtype]}")
    return fast


def check_checkpoint_sources(path, variants: list[Variant], allow_other_source: bool,
                             log: Callable[[str], None]) -> None:
    """Every checkpoint variant was converted from the model at `path` (see
    compare_checkpoints.check_source); reopening each reads only its JSON and header."""
    paths = list(dict.fromkeys(v.checkpoint for v in variants if v.checkpoint is not None))
    if not paths:
        return
    source = open_source(path)
    for ckpt_path in paths:
        ckpt = open_checkpoint(ckpt_path)
        if check_source(ckpt, source, allow_other_source):
            log(f"{ckpt.path} was converted from {ckpt.source.get('path')}; compared with "
                f"{source.path} as asked (--allow-other-source)")
        if ckpt.quant.kv_bits != 16:
            log(f"{ckpt.path} records a {ckpt.quant.kv_bits}-bit KV cache as its default; "
                f"compare uses the --kv settings instead")


def compare(path, text: str, variants: list[Variant], *, text_label: str, device: str = "auto",
            dtype: str = "auto", n_windows: int = 8, window_len: int = 1024, gen_tokens: int = 32,
            log: Callable[[str], None] = lambda _: None, limits: DeviceLimits | None = None,
            allow_other_source: bool = False) -> Comparison:
    """The reference (16-bit weights as stored, 16-bit KV) and each variant on the same windows
    of `text`; `variants` must not contain the reference. Checkpoint variants must come from
    the model at `path` unless `allow_other_source`. With the device's `limits`, every row
    carries its per-phase roofline diagnosis."""
    if path is not None and is_lowbit_checkpoint(Path(path)):
        raise EvaluationError(f"{path} is a lowbit checkpoint: compare needs the 16-bit model it "
                              f"came from (an HF directory or a GGUF file) as the reference")
    check_checkpoint_sources(path, variants, allow_other_source, log)
    reference = load_model(path, device=device, dtype=dtype)
    cfg = reference.config
    check_window_fits(window_len, cfg.max_position_embeddings)
    ids = reference.tokenizer.encode(text, add_special_tokens=False)
    windows = split_windows(ids, n_windows, window_len)
    if len(windows) < n_windows:
        log(f"the text holds {len(ids)} tokens: {len(windows)} window(s) of {window_len} fit, "
            f"not the {n_windows} asked for; using {len(windows)}")
    prompt = ids[:min(PROMPT_TOKENS, cfg.max_position_embeddings - gen_tokens)]
    dev, dt = str(reference.device), DTYPE_NAMES[reference.dtype]

    models = {REFERENCE.weights_id: reference}
    for v in variants:
        if v.weights_id not in models:
            log(f"loading {v.weights}")
            models[v.weights_id] = load_variant(path, v, dev, dt)
    rows = {v: Row(v) for v in [REFERENCE, *variants]}
    for v in variants:
        if v.checkpoint is not None:
            note = calibration_overlap(v.quant, text, windows.tokens.numel())
            rows[v].calibration_overlap = note
            if note:
                log(f"{v.name}: {note}")
    speed_models: dict[tuple, LoadedModel] = {}
    for v in [REFERENCE, *variants]:
        if v.weights_id not in speed_models:
            speed_models[v.weights_id] = speed_model(path, models[v.weights_id], v, dtype, log)
        measure_speed(speed_models[v.weights_id], v, prompt, gen_tokens, rows[v], limits)
        r = rows[v]
        log(f"speed {v.name} ({r.speed_dtype}): prefill {r.prefill_tok_s:.1f} tok/s, decode "
            f"{r.decode_tok_s:.1f} tok/s")
    measure_accuracy(models, variants, windows, rows, log)
    return Comparison(rows[REFERENCE], [rows[v] for v in variants], reference.source, dev, dt,
                      text_label, windows, len(prompt), gen_tokens)
