"""Tokens to text as they come, with stop strings: what a streamed response may already show."""

from __future__ import annotations

from typing import Any


class TextAssembler:
    """One request's output text, built token by token.

    `add(token)` returns the text that is now final. Two things are held back: the end of a character whose bytes
    are split over tokens (the tokenizer decodes it as U+FFFD until it is whole), and, with stop strings, the last
    `len(longest stop) - 1` characters, which may still turn out to start one. Once a stop string appears,
    `stopped` is set and the text ends just before it (OpenAI leaves stop strings out); later tokens add nothing.
    `flush()` returns what is held back when the request ends for another reason.

    Decoding is incremental: each token decodes a window starting at the previous complete boundary, not the whole
    output, so a long response costs linear time. Special tokens (EOS) are skipped, as in `Engine.generate`.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoding from here reproduces the text before `_read`
        self._read = 0  # tokens whose text is in `_text`
        self._text = ""  # decoded text of tokens [0, _read)
        self._sent = 0  # characters of `_text` already returned
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return self._text[: self._sent]

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back rest (an incomplete character included), at the end of the request."""
        if self.stopped:
            return ""
        if self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix : self._read])
            self._text += self._decode(self._ids[self._prefix :])[len(before) :]
            self._read = len(self._ids)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _release(self, *, final: bool) -> str:
        text = self._text
        end = len(text)
        if self.stop:
            # Text up to `_sent` was released with `_hold` more characters known and no stop string among them,
            # so a stop string can only begin at `_sent` or later.
            hits = [i for s in self.stop if (i := text.find(s, self._sent)) >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end = max(self._sent, len(text) - self._hold)
        out = text[self._sent : end]
        self._sent = end
        return out
