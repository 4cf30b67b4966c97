"""What the engine can take, as a frozen object any thread may read: its context length, its
KV pool and its vocabulary, and the one check of a group against them.

The check runs once, where a request becomes groups (the server's edge, or `generate` for
callers in-process); `GroupedEngine.add` then only asserts. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.engine.request import EngineInputError, Member


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix, leaving every prompt at least one token of suffix (the last
    prompt token must run per row to produce that row's first logits)."""
    limit = min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def worst_case_tokens(members: Sequence[Member]) -> int:
    """KV slots a group may need at most: its shared prefix once, each member's rest."""
    prefix = shared_prefix_length([m.prompt_ids for m in members])
    return prefix + sum(len(m.prompt_ids) - prefix + m.params.max_tokens for m in members)


@dataclass(frozen=True)
class EngineLimits:
    max_context: int  # tokens of one sequence: prompt and completion
    kv_capacity: int  # tokens the KV pool holds
    vocab_size: int

    def check_group(self, members: Sequence[Member]) -> None:
        """Raises EngineInputError for a group the engine could never serve as asked; one that
        only has to wait for room is fine."""
        if not members:
            raise EngineInputError("a group has no members")
        for member in members:
            self.check_member(member)
        self.check_room(members)

    def check_room(self, members: Sequence[Member]) -> None:
        """The group's worst case fits the KV pool (its members checked on their own)."""
        needed = worst_case_tokens(members)
        if needed > self.kv_capacity:
            raise EngineInputError(
                f"this request may need {needed} tokens of KV cache (every prompt and its "
                f"max_tokens), more than the server's whole KV cache of {self.kv_capacity} "
                "tokens (--kv-cache-mb); send fewer questions or a smaller max_tokens",
                "max_tokens")

    def check_member(self, member: Member) -> None:
        if not member.prompt_ids:
            raise EngineInputError("the prompt is empty", "messages")
        problems = member.params.problems()
        if problems:
            field, reason = problems[0]
            raise EngineInputError(f"{field}: {reason}", field)
        if any(not 0 <= t < self.vocab_size for t in member.prompt_ids):
            raise EngineInputError("the prompt holds token ids outside the vocabulary", "prompt")
        needed = len(member.prompt_ids) + member.params.max_tokens
        if needed > self.max_context:
            raise EngineInputError(
                f"this model's maximum context length is {self.max_context} tokens, but "
                f"{needed} were requested ({len(member.prompt_ids)} in the prompt, "
                f"{member.params.max_tokens} for the completion)",
                "max_tokens" if len(member.prompt_ids) < self.max_context else "messages",
            )

    def fits(self, members: Sequence[Member]) -> bool:
        """Cheap invariants of a checked group, for assertions."""
        return bool(members) and worst_case_tokens(members) <= self.kv_capacity and all(
            len(m.prompt_ids) + m.params.max_tokens <= self.max_context for m in members)
