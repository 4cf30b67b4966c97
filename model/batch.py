"""The engine's running state (groups, their rows, prefill jobs) and how one step's work becomes
the tensors of one forward pass (`build_step`)."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from model.attention import AttentionPlan, DecodePlan, PrefillBlock, SharedExtent
from model.forward import StepInputs
from model.prefix_cache import Job, Node
from model.request import Member
from model.text_stream import TextStream

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


def build_step(decode_rows: list[Row], chunks: list[Chunk], scale: float, dtype: torch.dtype,
               device: torch.device) -> tuple[StepInputs, list[Row]]:
    """The forward's inputs for one step -> (inputs, decode rows in the order they run).
    Decode rows come first, sorted by their cache path so the rows under each node are
    contiguous; then each prefill chunk. Outputs: every decode row, then the last token of each
    chunk that completes a row's prompt."""
    paths = {row: row.leaf.path() for row in decode_rows}
    rows = sorted(decode_rows, key=lambda r: [n.serial for n in paths[r]])
    token_ids = [r.output_ids[-1] for r in rows]
    positions = [r.next_position for r in rows]
    slots = [r.tail_start + r.num_fed for r in rows]
    outputs = list(range(len(rows)))
    blocks = []
    for chunk in chunks:
        job, offset = chunk.job, len(token_ids)
        first, end = job.num_done, job.num_done + chunk.length
        token_ids += job.tokens[first:end]
        positions += range(job.first_position + first, job.first_position + end)
        slots += range(job.start + first, job.start + end)
        blocks.append(_prefill_block(job, offset, chunk.length, device))
        if job.row is not None and end == len(job.tokens):
            outputs.append(len(token_ids) - 1)
    decode = _decode_plan(rows, paths, dtype, device) if rows else None

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    plan = AttentionPlan(decode, tuple(blocks), scale)
    return StepInputs(tensor(token_ids), tensor(positions), tensor(slots), plan,
                      tensor(outputs)), rows


def _decode_plan(rows: list[Row], paths: dict[Row, list[Node]], dtype: torch.dtype,
                 device: torch.device) -> DecodePlan:
    shared = []
    depth = max(len(p) for p in paths.values())
    for level in range(depth):
        first = 0
        for index in range(1, len(rows) + 1):
            node = _node_at(paths[rows[first]], level)
            if index < len(rows) and _node_at(paths[rows[index]], level) is node:
                continue
            if node is not None:
                shared.append(SharedExtent(node.start, len(node.tokens), first, index, level))
            first = index
    # each row's own tokens, including the one fed now (its KV is written before attention)
    lengths = torch.tensor([r.num_fed + 1 for r in rows], device=device)
    starts = torch.tensor([r.tail_start for r in rows], device=device)
    steps = torch.arange(int(lengths.max()), device=device)
    is_real = steps[None, :] < lengths[:, None]
    tail_index = torch.where(is_real, starts[:, None] + steps[None, :], starts[:, None])
    tail_mask = torch.zeros(is_real.shape, dtype=dtype, device=device)
    tail_mask.masked_fill_(~is_real, float("-inf"))
    return DecodePlan(len(rows), tuple(shared), depth + 1, tail_index,
                      tail_mask[:, None, None, :])


def _node_at(path: list[Node], level: int) -> Node | None:
    return path[level] if level < len(path) else None


def _prefill_block(job: PrefillJob, offset: int, length: int,
                   device: torch.device) -> PrefillBlock:
    context = [torch.arange(start, start + size) for start, size in job.context]
    own = torch.arange(job.start, job.start + job.num_done + length)
    key_index = torch.cat([*context, own]).to(device)
    num_context = int(key_index.shape[0]) - int(own.shape[0])
    # query i (own position num_done + i) sees the whole context and own keys up to itself
    query_pos = torch.arange(length)[:, None] + job.num_done
    key_pos = torch.arange(int(own.shape[0]))[None, :]
    mask = torch.cat([torch.ones(length, num_context, dtype=torch.bool), key_pos <= query_pos],
                     dim=1)
    return PrefillBlock(offset, length, key_index, mask.to(device))
