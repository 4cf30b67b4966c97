"""The engine's running state (groups, their rows, prefill jobs) and how one step's work becomes
the tensors of one forward pass (`build_step`)."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from model.engine.prefix_cache import Job, Node
from model.engine.request import Member
from model.engine.text_stream import TextStream
from model.forward.attention import AttentionPlan, Span
from model.forward.decoder import StepInputs

_group_serials = itertools.count()


@dataclass(eq=False)
class PrefillJob(Job):
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
    def is_done(self) -> bool:  # the Job flag the prefix cache reads
        return self.num_done >= len(self.tokens)

    @property
    def num_left(self) -> int:
        return len(self.tokens) - self.num_done


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
    stream: TextStream
    generator: torch.Generator | None
    stop_token_ids: frozenset[int]
    job: PrefillJob | None = None
    num_fed: int = 0  # own tokens whose KV is in the pool
    output_ids: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # prompt done: waits here for its group's other rows
    is_finished: bool = False

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


def build_step(decode_rows: list[Row], chunks: list[Chunk],
               scale: float) -> tuple[StepInputs, list[Row]]:
    """The forward's inputs for one step, on the CPU -> (inputs, decode rows in the order they
    run). Decode rows come first, sorted by their cache path so that rows sharing a prefix are
    neighbours (attention finds their keys in cache); then each prefill chunk. Outputs: every
    decode row, then the last token of each chunk that completes a row's prompt."""
    paths = {row: row.leaf.path() for row in decode_rows}
    rows = sorted(decode_rows, key=lambda r: [n.serial for n in paths[r]])
    token_ids = [r.output_ids[-1] for r in rows]
    positions = [r.next_position for r in rows]
    slots = [r.tail_start + r.num_fed for r in rows]
    outputs = list(range(len(rows)))
    # a decode row attends its path's nodes, then its own tokens including the one fed now
    # (every token's key and value are written to the pool before attention)
    spans = [Span(index, 1, extents(row.leaf), row.tail_start, row.num_fed)
             for index, row in enumerate(rows)]
    for chunk in chunks:
        job, offset = chunk.job, len(token_ids)
        first, end = job.num_done, job.num_done + chunk.length
        token_ids += job.tokens[first:end]
        positions += range(job.first_position + first, job.first_position + end)
        slots += range(job.start + first, job.start + end)
        spans.append(Span(offset, chunk.length, job.context, job.start, first))
        if job.row is not None and end == len(job.tokens):
            outputs.append(len(token_ids) - 1)

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    plan = AttentionPlan.of(spans, scale, num_decode_rows=len(rows))
    return StepInputs(tensor(token_ids), tensor(positions), tensor(slots), plan,
                      tensor(outputs)), rows
