"""Which text calibrates a checkpoint, kept off the text that evaluates it.

A calibration text is split into documents (one a line, as the news corpus stores them). By
default it is the news corpus minus every document that `lowbit compare`'s evaluation windows
touch (its first n_windows × window_len tokens, `text.evaluation_token_ranges`). A user file
(--calib FILE) is checked against those evaluation windows token by token and refused if they
share a run of OVERLAP_NGRAM tokens. Documents are drawn in a seeded random order until the
requested token count is reached; the record of what was used goes into QuantConfig.calibration
(and so into lowbit.json).

Tokenizers are passed in (anything with encode(text, add_special_tokens=False) and decode(ids)),
so this module needs nothing from the engine.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .text import TextError, default_text_path, evaluation_token_ranges, read_text

# Measured on the default model (gptq, int4 g128, its tied lm_head quantized too; mean KL on
# compare's 8 windows): 8192 tokens 0.184, 16384 0.191, 32768 0.181 (seconds on this loaded 2-core
# CPU, one thread: 205, 207, 382). Past 8k the sample, not the size, moves the result; the default
# keeps 32k because a larger model's Hessians need n >> K tokens (K = 14336 in Llama-3-8B).
DEFAULT_TOKENS = 32768
DEFAULT_WINDOW = 1024  # the length of compare's windows: calibrate as the model is evaluated
DEFAULT_EVAL_WINDOWS = 8
# Shared runs of this many tokens mean shared text. Measured on the news corpus with the default
# model's tokenizer: its 263 documents after the evaluation windows (66982 tokens) share 0 runs
# of 16 or 32 tokens with the 8 x 1024 evaluated ones, and 19 runs of 8 (stock phrases).
OVERLAP_NGRAM = 32


class CalibrationTextError(TextError):
    """Calibration text lowbit will not use: too short, or overlapping the evaluation text."""


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass(frozen=True)
class CalibrationText:
    """windows: int64 (S, L), S windows of L consecutive tokens of the chosen documents joined by
    newlines; record: what QuantConfig.calibration stores about them."""

    windows: torch.Tensor
    record: dict

    @property
    def tokens(self) -> int:
        return self.windows.numel()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _documents(text: str) -> list[tuple[int, int, str]]:
    """(line number from 1, character offset, text) of every non-blank line."""
    docs, offset = [], 0
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            docs.append((number, offset, line))
        offset += len(line) + 1
    return docs


def evaluation_span(tokenizer: TextTokenizer, text: str, n_windows: int,
                    window_len: int) -> tuple[list[int], int]:
    """The evaluation windows' token ids (as compare takes them: the text tokenized without
    special tokens, its first n_windows × window_len ids) and the number of characters of text
    they cover (their decoded length; byte-level BPE decodes a prefix to exactly its text)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    end = evaluation_token_ranges(n_windows, window_len)[-1][1]
    used = ids[:end]
    return used, len(tokenizer.decode(used))


def _ngrams(ids: list[int], n: int) -> set[int]:
    return {hash(tuple(ids[i:i + n])) for i in range(len(ids) - n + 1)}


def shared_ngrams(ids: list[int], other: list[int], n: int = OVERLAP_NGRAM) -> int:
    """How many n-token runs of `ids` also occur in `other`."""
    seen = _ngrams(other, n)
    return sum(hash(tuple(ids[i:i + n])) in seen for i in range(len(ids) - n + 1))


def _line_ranges(numbers: list[int]) -> str:
    """[3, 4, 5, 9] → '3-5,9' (compact, for lowbit.json)."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def select_windows(tokenizer: TextTokenizer, docs: list[tuple[int, int, str]], n_tokens: int,
                   window_len: int, seed: int, where: str) -> tuple[torch.Tensor, list[int]]:
    """Documents in a seeded random order, joined by newlines, until n_tokens are reached, cut
    into windows of window_len → (windows (S, L) int64, line numbers used, sorted)."""
    if n_tokens < window_len:
        raise CalibrationTextError(f"--calib-tokens {n_tokens} is less than one window of "
                                   f"{window_len} tokens")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, ids = [], []
    for i in order:
        chosen.append(docs[i])
        ids += tokenizer.encode(docs[i][2] + "\n", add_special_tokens=False)
        if len(ids) >= n_tokens:
            break
    n_windows = min(n_tokens, len(ids)) // window_len
    if len(ids) < n_tokens:
        raise CalibrationTextError(
            f"{where} holds {len(ids)} tokens, fewer than the {n_tokens} asked for "
            f"(--calib-tokens {n_windows * window_len} would fit)")
    windows = torch.tensor(ids[:n_windows * window_len], dtype=torch.long).view(n_windows, -1)
    return windows, sorted(n for n, _, _ in chosen)  # (S, L)


def calibration_text(tokenizer: TextTokenizer, path: str | Path | None = None, *,
                     n_tokens: int = DEFAULT_TOKENS, window_len: int = DEFAULT_WINDOW,
                     seed: int = 0, eval_windows: int = DEFAULT_EVAL_WINDOWS,
                     eval_window_len: int = DEFAULT_WINDOW,
                     eval_path: str | Path | None = None) -> CalibrationText:
    """Calibration windows from `path` (None: the evaluation text itself, minus what evaluation
    reads), never from the text `lowbit compare` evaluates on: the first eval_windows ×
    eval_window_len tokens of `eval_path` (None: the news corpus). Raises CalibrationTextError
    when the calibration text shares a run of OVERLAP_NGRAM tokens with them or is too short."""
    eval_path = default_text_path() if eval_path is None else Path(eval_path)
    eval_text = read_text(eval_path)
    eval_ids, eval_chars = evaluation_span(tokenizer, eval_text, eval_windows, eval_window_len)
    calib_path = eval_path if path is None else Path(path)
    text = eval_text if path is None else read_text(calib_path)
    digest = sha256_of(calib_path)
    docs = _documents(text)
    record = {"file": str(calib_path), "sha256": digest, "seed": seed, "window_len": window_len}
    if digest == sha256_of(eval_path):
        kept = [d for d in docs if d[1] >= eval_chars]
        skipped = [d[0] for d in docs if d[1] < eval_chars]
        record["excluded"] = {
            "lines": _line_ranges(skipped),
            "why": f"touched by compare's evaluation windows ({eval_windows} x {eval_window_len} "
                   f"tokens, the first {eval_chars} characters)"}
        docs = kept
        where = f"{calib_path} outside the evaluation windows"
    else:
        where = str(calib_path)
    if not docs:
        raise CalibrationTextError(f"{where}: no documents left to calibrate on")
    windows, lines = select_windows(tokenizer, docs, n_tokens, window_len, seed, where)
    shared = shared_ngrams(windows.flatten().tolist(), eval_ids)
    if shared:
        raise CalibrationTextError(
            f"{calib_path}: {shared} runs of {OVERLAP_NGRAM} tokens also occur in the evaluation "
            f"windows of `lowbit compare` (the first {eval_windows} x {eval_window_len} tokens of "
            f"{eval_path.name}); calibrating on them would flatter every comparison")
    record.update({"lines": _line_ranges(lines), "documents": len(lines),
                   "tokens": windows.numel(), "windows": windows.shape[0],
                   "disjoint_from": {"file": eval_path.name, "sha256": sha256_of(eval_path),
                                     "tokens": len(eval_ids)}})
    return CalibrationText(windows, record)


def overlapping_evaluation(record: dict, eval_text_sha256: str, eval_tokens: int) -> str | None:
    """For compare: None when a checkpoint's calibration record shows it was kept off the first
    `eval_tokens` tokens of the text with this sha256; else a one-line warning."""
    text = (record or {}).get("text")
    if not text:
        return None  # no calibration text: nothing could overlap
    disjoint = text.get("disjoint_from", {})
    if disjoint.get("sha256") == eval_text_sha256:
        if disjoint.get("tokens", 0) >= eval_tokens:
            return None
        return (f"calibration was kept off only the first {disjoint.get('tokens', 0)} tokens of "
                f"this text, but {eval_tokens} are evaluated: the later windows may overlap "
                f"calibration")
    if text.get("sha256") == eval_text_sha256:
        return (f"calibrated on this very text (kept off the evaluation windows of "
                f"{disjoint.get('file', 'another text')} only): the evaluated windows may be "
                f"calibration text")
    return ("calibrated on another text than this evaluation; lowbit cannot tell whether "
            "they overlap")
