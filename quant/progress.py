"""A one-line progress bar on stderr: n/total, percent, rate, and the item at hand.

On a terminal it redraws in place (at most 10 times a second); anywhere else (a log file, a
pipe, CI) it stays silent until `close`, which prints one final line.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24
REDRAW_SECONDS = 0.1


class Progress:
    def __init__(self, total: int, label: str, unit: str = "tensors", stream: TextIO | None = None,
                 enabled: bool = True):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.n = 0
        self.item = ""
        self.start = time.perf_counter()
        self._drawn = 0.0

    def update(self, n: int = 1, item: str = "") -> None:
        self.n += n
        self.item = item
        now = time.perf_counter()
        if self.live and (now - self._drawn >= REDRAW_SECONDS or self.n >= self.total):
            self._drawn = now
            self.stream.write("\r" + self._line(now) + "\x1b[K")
            self.stream.flush()

    def _line(self, now: float) -> str:
        frac = self.n / self.total if self.total else 1.0
        filled = int(frac * BAR_WIDTH)
        rate = self.n / max(now - self.start, 1e-9)
        return (f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.n}/{self.total} "
                f"{100 * frac:3.0f}% {rate:.1f} {self.unit}/s {self.item}")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.live:
            self.stream.write("\n")  # keep the error that follows off the bar's line

    def close(self) -> None:
        if not self.enabled:
            return
        self.item = f"done in {time.perf_counter() - self.start:.1f} s"
        prefix, suffix = ("\r", "\x1b[K\n") if self.live else ("", "\n")
        self.stream.write(prefix + self._line(time.perf_counter()) + suffix)
        self.stream.flush()
