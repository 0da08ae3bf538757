"""Text for evaluation and calibration: the default news corpus, validated reading, and which
token ranges evaluation uses (so calibration can stay off them).

Lives in quant/ because calibration (quant/) and evaluation (engine/) both need it and data flows
quant → engine only.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

CORPUS_PACKAGE = "gensim"
CORPUS_FILE = Path("test") / "test_data" / "lee_background.cor"  # ABC news, ~360 KB, ~80k tokens
INSTALL_HINT = "pip install --no-deps gensim"


class TextError(ValueError):
    """An evaluation text lowbit cannot use; the message names the file and what is wrong."""


def default_text_path() -> Path:
    """lee_background.cor inside the installed gensim package (located, never imported)."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    path = Path(spec.origin).parent / CORPUS_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise TextError(f"the default evaluation text (the news corpus {CORPUS_FILE.name} shipped "
                        f"in gensim) is not installed; install it with: {INSTALL_HINT}, "
                        f"or pass --text FILE")
    return path


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 text file; TextError if it is missing, unreadable, not UTF-8 or
    holds nothing but whitespace."""
    path = Path(path)
    if not path.exists():
        raise TextError(f"{path}: no such file")
    if not path.is_file():
        raise TextError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TextError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{path}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset "
                        f"{e.start})") from None
    if not text.strip():
        raise TextError(f"{path}: the file is empty")
    return text


def evaluation_token_ranges(n_windows: int, window_len: int) -> list[tuple[int, int]]:
    """[start, end) token indices of the evaluation windows: consecutive, non-overlapping, from
    the first token of the text tokenized without special tokens. Calibration must draw its
    samples from tokens at or after the last `end` to stay off what evaluation measures."""
    return [(i * window_len, (i + 1) * window_len) for i in range(n_windows)]
