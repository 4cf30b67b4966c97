"""What the scheduler moves: admitted groups, their rows (one per member) and the prefill jobs
that compute their prompts into the pool. Torch-free: the tensors a row needs to decode stay
with the engine."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from model.engine.prefix_cache import Node
from model.engine.proposer import NgramIndex
from model.engine.request import Member, Status

_group_serials = itertools.count()


@dataclass(eq=False)
class PrefillJob:
    """Computes the KV of `tokens` into the slots from `start`, in chunks; the tokens continue
    a sequence whose earlier tokens' KV sits in the `context` extents."""

    tokens: Sequence[int]
    start: int
    first_position: int
    context: tuple[tuple[int, int], ...]  # (start, length) extents, in sequence order
    row: Row | None = None  # None: fills a shared prefix node
    node: Node | None = None  # the node it fills (locked until the job is done)
    num_done: int = 0

    @property
    def is_done(self) -> bool:  # what the prefix cache asks of a pending node's `Job`
        return self.num_done >= len(self.tokens)

    @property
    def num_left(self) -> int:
        return len(self.tokens) - self.num_done

    @property
    def is_dropped(self) -> bool:
        """Its row has finished (aborted) before its prompt was computed."""
        return self.row is not None and self.row.is_finished


@dataclass(eq=False)
class Group:
    members: list[Member]
    uses_trained_head: bool  # CSA + LM-head adapter apply (the client chose grouped QA)
    serial: int = field(default_factory=lambda: next(_group_serials))
    prefix_length: int = 0
    rows: list[Row] = field(default_factory=list)

    @property
    def namespace(self) -> Hashable:
        return self.members[0].namespace

    @property
    def is_done(self) -> bool:
        return all(r.is_finished for r in self.rows)


@dataclass(eq=False)
class Row:
    """Decoding state of one admitted member. `leaf` is the deepest cache node its prompt
    matched (the group's shared prefix, or deeper), locked while the row runs; its own tokens
    (the rest of its prompt, then generated tokens) live in one extent of the pool, reserved
    for the worst case at admission."""

    member: Member
    group: Group
    leaf: Node
    suffix: list[int]  # the prompt after `leaf`
    tail_start: int
    tail_capacity: int
    cached_tokens: int
    job: PrefillJob | None = None
    num_fed: int = 0  # own tokens whose KV is in the pool
    output_ids: list[int] = field(default_factory=list)
    lookup: NgramIndex | None = None  # its prompt and output, once it has proposed

    def write(self, token: int) -> None:
        self.output_ids.append(token)
        if self.lookup is not None:
            self.lookup.extend([token])

    @property
    def is_finished(self) -> bool:
        return self.member.status is Status.FINISHED

    @property
    def is_decoding(self) -> bool:
        return self.member.status is Status.DECODE

    @property
    def own_tokens(self) -> list[int]:
        return self.suffix + self.output_ids

    @property
    def next_position(self) -> int:
        return self.leaf.depth + self.num_fed


@dataclass(frozen=True)
class Chunk:
    job: PrefillJob
    length: int


def extents(node: Node) -> tuple[tuple[int, int], ...]:
    return tuple(n.extent for n in node.path())
