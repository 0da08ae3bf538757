"""Lowbit checkpoints as `lowbit compare` variants: opened and validated before any model loads,
checked to come from the reference model, and flagged when their calibration text may overlap
the evaluated windows.

A checkpoint's KL means "what quantization cost" only against the 16-bit model it was converted
from; against any other model it measures the distance between two models. The source is
identified by the fingerprint `lowbit convert` records in lowbit.json ("source": {"path",
"fingerprint", "kind"}), not by its path: an HF directory's fingerprint hashes config.json and
its weight files' sizes and mtimes, a GGUF's its size, first 8 MiB and last 1 MiB
(quant/hf_source.py, quant/gguf_source.py). A path may since hold another model, and the same
model may sit at another path; `allow_other_source` is for the second case (a copy, a rebuilt
cache) and still requires the same tensors, since KL compares distributions over one vocabulary.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lowbit.engine.evaluate import EvaluationError
from lowbit.quant.architecture import ModelConfig
from lowbit.quant.calibration_text import overlapping_evaluation
from lowbit.quant.checkpoint import Checkpoint, read_checkpoint
from lowbit.quant.config import QuantConfig
from lowbit.quant.sources import LOWBIT_MARKER, ModelSource, is_lowbit_checkpoint


class CheckpointMismatchError(EvaluationError):
    """A checkpoint compare will not score against this reference: converted from another
    model (unless allowed), or of another architecture."""


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate the lowbit checkpoint at `path` (JSON and safetensors header, no tensor data);
    EvaluationError for a path that is not one, CheckpointError for a corrupt one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EvaluationError(f"--checkpoint {path}: no such directory")
    if not is_lowbit_checkpoint(path):
        raise EvaluationError(f"--checkpoint {path}: not a lowbit checkpoint (no {LOWBIT_MARKER}); "
                              f"write one with `lowbit convert`, or pass a 16-bit model as MODEL")
    return read_checkpoint(path)


def describe_architecture(mc: ModelConfig) -> str:
    return (f"{mc.model_type}, {mc.num_layers} layers, hidden {mc.hidden_size}, "
            f"vocab {mc.vocab_size}")


def _same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(Path(a).expanduser()) == os.path.realpath(Path(b).expanduser())


def check_source(ckpt: Checkpoint, reference: ModelSource, allow_other_source: bool) -> bool:
    """Refuse `ckpt` unless it was converted from `reference` (same fingerprint) or
    `allow_other_source` and the two have the same tensors. Returns True when the sources
    differ (and that was allowed), for the caller to say so."""
    recorded = ckpt.source.get("path")
    fingerprint = ckpt.source.get("fingerprint")
    if fingerprint == reference.fingerprint:
        return False
    if not allow_other_source:
        if recorded is not None and _same_path(recorded, reference.path):
            raise CheckpointMismatchError(
                f"{ckpt.path} was converted from {recorded} (fingerprint {fingerprint}), which "
                f"has changed since (now {reference.fingerprint}); convert it again, or pass "
                f"--allow-other-source to compare it anyway")
        raise CheckpointMismatchError(
            f"{ckpt.path} was converted from {recorded}, not from the reference "
            f"{reference.path}: pass {recorded} as MODEL, or --allow-other-source to compare it "
            f"against {reference.path} anyway")
    if ckpt.model_config.tensor_shapes() != reference.model_config.tensor_shapes():
        raise CheckpointMismatchError(
            f"{ckpt.path} is a {describe_architecture(ckpt.model_config)} model, the reference "
            f"{reference.path} a {describe_architecture(reference.model_config)} one: KL needs "
            f"the same architecture and vocabulary")
    return True


def calibration_overlap(quant: QuantConfig, text: str, eval_tokens: int) -> str | None:
    """None when `quant`'s calibration record shows its text was kept off the first
    `eval_tokens` tokens of `text` (or it has no calibration text); else the one-line reason
    the row is flagged. `text` is hashed as read (UTF-8), which is its file's bytes."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return overlapping_evaluation(quant.calibration, digest, eval_tokens)
