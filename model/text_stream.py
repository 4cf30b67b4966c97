"""Incremental detokenization with stop strings, for one generated sequence.

Text is released only when it is final: never half of a multi-byte character, and never the
start of what may become a stop string. When a stop string appears, the text ends just before it.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._token_ids: list[int] = []
        self.text = ""  # everything released so far
        self.is_stopped = False  # a stop string was found

    def add(self, token_id: int) -> str:
        """Appends a token; returns the newly released text."""
        self._token_ids.append(token_id)
        decoded = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        cut = self._first_stop(decoded)
        if cut is not None:
            self.is_stopped = True
            return self._release(decoded[:cut])
        if decoded.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its rest
            return ""
        return self._release(decoded[: len(decoded) - self._partial_stop_length(decoded)])

    def flush(self) -> str:
        """Releases what was held back; call once the sequence has ended for another reason."""
        if self.is_stopped:
            return ""
        return self._release(self._tokenizer.decode(self._token_ids, skip_special_tokens=True))

    def _release(self, final_text: str) -> str:
        if len(final_text) <= len(self.text):
            return ""
        delta, self.text = final_text[len(self.text) :], final_text
        return delta

    def _first_stop(self, decoded: str) -> int | None:
        # only text after what was released can hold a new stop string
        start = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
        found = [i for s in self._stop if (i := decoded.find(s, start)) >= 0]
        return min(found) if found else None

    def _partial_stop_length(self, decoded: str) -> int:
        """Length of the longest tail of `decoded` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(decoded)), longest, -1):
                if decoded.endswith(stop[:size]):
                    longest = size
                    break
        return longest
