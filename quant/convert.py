"""Streaming conversion: a 16-bit model source → a lowbit checkpoint directory.

One source tensor at a time is read, quantized if it is a linear weight stored quantized (see
checkpoint.quantized_linears), written to its slot in model.safetensors and dropped, so host
memory holds about one tensor (plus quantization temporaries), never the model: a model larger
than RAM converts. The output is built in `OUT.tmp-<pid>` and renamed into place when complete;
lowbit.json is written last.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (METADATA_KEY, WEIGHTS_FILE, CheckpointError, SafetensorsWriter,
                         atomic_directory, check_output, expected_tensors, lowbit_json,
                         storage_plan)
from .config import BNB_METHODS, QuantConfig, QuantConfigError
from .formats import Int4Weight, Int8Weight
from .progress import Progress
from .quantize import METHODS, quantize_weight
from .sources import LOWBIT_MARKER, ModelSource, open_source

# (module name, 16-bit weight) → its quantized format. Calibrated methods ("search", "gptq")
# need per-layer activations; they arrive as a Quantizer built from calibration data and
# passed to `convert`, leaving the streaming and the file format untouched.
# 2M weights a block keeps quantization scratch near 40 MB (measured: +79 MB of peak RSS with
# 4M-weight blocks, +133 MB with 16M, +266 MB quantizing a 28M-weight lm_head whole).
ROW_BLOCK_WEIGHTS = 1 << 21
Quantizer = Callable[[str, torch.Tensor], Int4Weight | Int8Weight]


class ConvertError(CheckpointError):
    """A conversion that cannot run as asked (output exists, source without a tokenizer, ...)."""


@dataclass(frozen=True)
class ConvertSummary:
    out: Path
    source: str
    quant: QuantConfig
    tensors: int  # tensors written
    parameters: int  # of the source model
    bytes_before: int  # the model in 16-bit: 2 bytes a parameter
    bytes_after: int  # tensor bytes written
    quantized_weights: int  # weights in linears stored quantized
    quantized_bytes: int  # their qweight + scales (+ zeros) bytes
    seconds: float
    peak_rss_bytes: int  # this process's high-water mark, mapped source pages included

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after

    @property
    def bits_per_weight_linears(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else 16.0

    @property
    def bits_per_weight_overall(self) -> float:
        return 8 * self.bytes_after / self.parameters


def peak_rss_bytes() -> int:
    """This process's resident high-water mark: VmHWM where /proc has it (Linux), else
    ru_maxrss. Linux carries ru_maxrss across exec from the forking parent (a child of a 1.3 GB
    parent reported 1.3 GB while its own peak was 0.6 GB); VmHWM belongs to the new image."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def source_kind(src: str | Path | ModelSource | None, source: ModelSource) -> str:
    if src is None:
        return "default-model"
    return "gguf" if str(source.path).lower().endswith(".gguf") else "hf-directory"


def quantize_in_row_blocks(w: torch.Tensor, cfg: QuantConfig,
                           block_weights: int = ROW_BLOCK_WEIGHTS) -> Int4Weight | Int8Weight:
    """quantize_weight(w, cfg), a block of output rows at a time, with identical results.

    Calibration-free methods treat rows independently (groups run along the input dimension),
    and quantize_affine's fp32 temporaries cost ~9 bytes a weight when quantizing a matrix
    whole: the 525M-weight lm_head of Llama-3-8B would need ~5 GB of scratch.
    """
    rows = max(1, block_weights // max(1, w.shape[1]))
    if w.shape[0] <= rows or cfg.method in BNB_METHODS:
        # bitsandbytes' 4-bit blocks run across rows and its double quantization centres all
        # block absmaxes on their mean: only the whole matrix gives bitsandbytes' own result
        return quantize_weight(w, cfg)
    # written into preallocated outputs: collecting the blocks and concatenating them held the
    # quantized matrix twice (measured on a 32000 x 4096 fp16 lm_head: anonymous memory peaked
    # 266 MB above the start that way, 69 MB (the output itself) this way)
    tensors: dict[str, torch.Tensor] = {}
    for start in range(0, w.shape[0], rows):
        block = quantize_weight(w[start:start + rows], cfg).tensors()
        for name, t in block.items():
            if name not in tensors:
                tensors[name] = t.new_empty((w.shape[0], *t.shape[1:]))  # (N, ...)
            tensors[name][start:start + t.shape[0]] = t
    fmt_cls = Int4Weight if cfg.weight_bits == 4 else Int8Weight
    return fmt_cls.from_tensors(tensors, cfg.group_size, w.shape[1], cfg.symmetric)


def calibration_free_quantizer(cfg: QuantConfig) -> Quantizer:
    """quant/quantize.py's method table, one weight (in row blocks) at a time."""
    if cfg.method not in METHODS:
        raise QuantConfigError(
            f"method {cfg.method!r} needs calibration inputs: `lowbit convert --method "
            f"{cfg.method}` calibrates first (available without it: "
            f"{', '.join(sorted(METHODS))})")
    return lambda module, w: quantize_in_row_blocks(w, cfg.for_module(module))


def _write_metadata_files(tmp: Path, source: ModelSource) -> None:
    files = source.tokenizer_files()
    if "tokenizer.json" not in files:
        raise ConvertError(f"{source.path}: no tokenizer.json; a checkpoint must be runnable")
    (tmp / "config.json").write_text(json.dumps(source.config, indent=2))
    for name, data in files.items():
        (tmp / name).write_bytes(data)


def convert(src: str | Path | ModelSource | None, out: Path, cfg: QuantConfig,
            force: bool = False, progress: bool = True,
            quantizer: Quantizer | None = None) -> ConvertSummary:
    """Convert `src` (HF directory, GGUF file, an opened ModelSource, None = the embedded default
    model) into a lowbit checkpoint at `out`.

    Scales and every 16-bit tensor take the source's 16-bit dtype (fp32 sources: bf16); each
    weight is cast to it before quantizing, as loading the source at that dtype and quantizing
    on the fly does, so both give bit-identical weights.
    """
    start = time.perf_counter()
    out = Path(out)
    if cfg.weight_bits == 16:
        raise QuantConfigError("a lowbit checkpoint holds int8 or int4 weights; 16-bit models "
                               "are used as they are")
    quantize = quantizer or calibration_free_quantizer(cfg)
    check_output(out, force)
    source = src if isinstance(src, ModelSource) else open_source(src)
    source.validate()
    mc, dtype = source.model_config, source.dtype()
    plan = storage_plan(mc, cfg, dtype)
    specs = expected_tensors(mc, cfg, dtype)
    origin = {"path": str(Path(source.path).resolve()), "fingerprint": source.fingerprint,
              "kind": source_kind(src, source)}
    meta = lowbit_json(cfg, dtype, origin, specs)
    bar = Progress(len(plan), "converting", enabled=progress)
    quantized_weights = quantized_bytes = 0
    with bar, atomic_directory(out, force) as tmp:
        _write_metadata_files(tmp, source)
        metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
        with SafetensorsWriter(tmp / WEIGHTS_FILE, specs, metadata) as writer:
            for item in plan:
                w = source.get_tensor(item.source_name).to(dtype)
                if item.linear is None:
                    writer.write(item.source_name, w)
                else:
                    fmt = quantize(item.linear, w)
                    for suffix, t in fmt.tensors().items():
                        writer.write(f"{item.linear}.{suffix}", t)
                    quantized_weights += w.numel()
                    quantized_bytes += fmt.nbytes
                    del fmt
                del w
                bar.update(1, item.linear or item.source_name)
        with open(tmp / LOWBIT_MARKER, "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
    return ConvertSummary(
        out=out, source=str(Path(source.path).resolve()), quant=cfg, tensors=len(specs),
        parameters=mc.num_parameters(), bytes_before=2 * mc.num_parameters(),
        bytes_after=sum(s.nbytes for s in specs.values()), quantized_weights=quantized_weights,
        quantized_bytes=quantized_bytes, seconds=time.perf_counter() - start,
        peak_rss_bytes=peak_rss_bytes())
