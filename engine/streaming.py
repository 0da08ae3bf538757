"""Token ids → text chunks as they are made: never a broken multi-byte character, never a partial
stop string on screen."""
from __future__ import annotations

from lowbit.engine.tokenizer import StreamDecoder, Tokenizer


class TextStream:
    """push(token_id) → text that is safe to show now. After a stop string appears, `stopped` is
    True and the text ends just before it."""

    def __init__(self, tokenizer: Tokenizer, stop_strings=()):
        self.decoder = StreamDecoder(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.held = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        text = self.held + self.decoder.push(token_id)
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = self._partial_stop_suffix(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        if self.stopped:
            return ""
        text, self.held = self.held + self.decoder.flush(), ""
        return text

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
