"""Prompt-lookup proposals: the tokens a decoding row is likely to write next, read from what it
has already seen, with no draft model (vLLM's `ngram` method, llama.cpp's `ngram-simple`). Its
last n tokens (the longest n first) are looked up in its own prompt and output, then in what its
group's other rows have written and in the latest answers of its tenant, and the tokens that
followed there are proposed. A SQuAD answer is a span of the passage, its `<answer>` tags are in
the system prompt's example, and a group's rows, and a passage's next question, answer in the
same shape: most of what this server writes has been seen before.

Pure Python, no torch: the engine verifies the proposals (`model.engine.sampling`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class NgramIndex:
    """A growing token sequence, and for each of its n-grams (1 <= n <= max_n) where the latest
    occurrence that has a token after it ends. A lookup of the sequence's own last n tokens thus
    finds an earlier occurrence, never itself. O(max_n) per appended token."""

    def __init__(self, max_n: int, tokens: Iterable[int] = ()):
        self.max_n = max_n
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after it
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # every n-gram ending before `token` now has a successor
            for n in range(1, min(self.max_n, end) + 1):
                self._next[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def continuation(self, gram: tuple[int, ...], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest occurrence of `gram`; [] if none."""
        start = self._next.get(gram)
        return [] if start is None else self.tokens[start : start + limit]


def propose(own: NgramIndex, others: Sequence[NgramIndex], limit: int) -> tuple[int, list[int]]:
    """(n, up to `limit` tokens) to verify after `own` (a row's prompt and output): its last n
    tokens, the longest n first, matched in its own sequence, then in each other source (its
    siblings' outputs, earlier answers) in order;
    (0, []) when nothing matches, so a row with nothing to go on costs nothing. The longer the
    match, the likelier the tokens: n is what the caller weighs them by."""
    tokens = own.tokens
    for n in range(min(own.max_n, len(tokens)), 0, -1):
        gram = tuple(tokens[-n:])
        for source in (own, *others):
            found = source.continuation(gram, limit)
            if found:
                return n, found
    return 0, []
