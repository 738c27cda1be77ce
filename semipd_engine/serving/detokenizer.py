"""Streaming detokenization with stop strings.

Text is emitted only once it is stable: a window that ends in an incomplete
UTF-8 sequence ("\ufffd") is held back, and so are the last characters that
could still be the start of a stop string. When the request ends, whatever is
left is flushed, so the concatenated deltas equal `decode(output_ids)`
(cut at the first stop string, which is not included, as in the OpenAI API).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: a little context for tokenizers that need it
        self.read_offset = 0  # ids already turned into `text`
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, new_ids) -> None:
        for t in new_ids:
            self.ids.append(t)
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._check_stop()

    def _check_stop(self) -> None:
        if not self.stop or self.stopped:
            return
        start = max(0, self.sent - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def finish(self) -> None:
        """The request ended: take the exact full decode (flushes held-back bytes)."""
        if not self.stopped:
            full = self._decode(self.ids)
            if full.startswith(self.text):
                self.text = full
            self._check_stop()

    def delta(self, final: bool = False) -> str:
        end = len(self.text) if (final or self.stopped) else max(self.sent, len(self.text) - self.holdback)
        out = self.text[self.sent : end]
        self.sent = end
        return out
