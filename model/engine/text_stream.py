"""Incremental detokenization with stop strings, for one generated sequence, in O(1) per token.

Each new token is decoded in a short window with the tokens just before it (tokenizers put
spaces and merge bytes depending on the neighbours), and only the text it adds is kept, as
vLLM and TGI do: the work per token does not grow with the length of the output.

Text is released only when it is final: never half of a multi-byte character, and never the
start of what may become a stop string. When a stop string appears, the text ends just before it.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._stop = stop
        self._token_ids: list[int] = []
        self._prefix_offset = 0  # the window's start: tokens whose text is known
        self._read_offset = 0  # tokens before it have been turned into text
        self._held = ""  # decoded but not released: it may begin a stop string
        self.text = ""  # everything released so far
        self.is_stopped = False  # a stop string was found

    def add(self, token_id: int) -> str:
        """Appends a token; returns the newly released text."""
        self._token_ids.append(token_id)
        self._held += self._decode_new(final=False)
        cut = self._first_stop(self._held)
        if cut is not None:
            self.is_stopped = True
            return self._release(cut)
        return self._release(len(self._held) - self._partial_stop_length(self._held))

    def flush(self) -> str:
        """Releases what was held back; call once the sequence has ended for another reason."""
        if self.is_stopped:
            return ""
        self._held += self._decode_new(final=True)
        return self._release(len(self._held))

    def _decode_new(self, final: bool) -> str:
        window = self._token_ids[self._prefix_offset :]
        known = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        decoded = self._decode(window)
        if not final and (len(decoded) <= len(known) or decoded.endswith("\ufffd")):
            return ""  # e.g. an incomplete UTF-8 sequence: wait for its rest
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return decoded[len(known) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def _release(self, length: int) -> str:
        delta, self._held = self._held[:length], self._held[length:]
        self.text += delta
        return delta

    def _first_stop(self, held: str) -> int | None:
        # a stop string never starts in released text: any start of one was held back
        found = [i for s in self._stop if (i := held.find(s)) >= 0]
        return min(found) if found else None

    def _partial_stop_length(self, held: str) -> int:
        """Length of the longest tail of `held` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(held)), longest, -1):
                if held.endswith(stop[:size]):
                    longest = size
                    break
        return longest
