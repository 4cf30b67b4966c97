"""Attention of one step's new tokens over the KV pool, planned once per step (`AttentionPlan`)
and applied in every layer by a backend (`model.forward.backends`): the C kernel on a CPU, the
Triton kernels on a GPU, torch's path (here) elsewhere.

A step's tokens come in spans: a decode row (one token) or a prefill chunk (consecutive tokens of
one sequence). A span's tokens attend their sequence's earlier tokens, which sit in the pool as
extents (the prefix-cache nodes on the sequence's path), then the sequence's own run of slots up
to and including themselves. Every kernel reads the spans as `SpanExtents`: no keys are
gathered into a copy.

The kernels compute each token on its own, in a fixed order of operations over its keys in
sequence order, so a token's output depends only on its query and its keys, never on the rest of
the batch or on where the cache split its keys into nodes: batched and grouped decoding
reproduce unbatched decoding bit for bit. Torch's path gathers the keys instead: decode rows
in one padded batch, each chunk on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Extent = tuple[int, int]  # (first pool slot, number of slots)


@dataclass(frozen=True)
class Span:
    """Tokens [offset, offset + n) of the step: consecutive positions of one sequence. Token i
    attends the `context` extents, then its own slots [own_start, own_start + own_before + i]."""

    offset: int
    n: int
    context: tuple[Extent, ...]
    own_start: int
    own_before: int  # the sequence's own tokens already in the pool before this span

    def extents_of(self, i: int) -> list[Extent]:
        return [*self.context, (self.own_start, self.own_before + i + 1)]


@dataclass(frozen=True)
class SpanExtents:
    """The spans' keys as the kernels read them (int64): span s is the step's tokens
    tokens[s] .. tokens[s + 1] - 1; its first token attends extents firsts[s] .. firsts[s + 1] - 1
    (starts, lengths) in order, and each next token one slot more of the last extent."""

    starts: torch.Tensor  # [E]
    lengths: torch.Tensor  # [E]
    firsts: torch.Tensor  # [S + 1]
    tokens: torch.Tensor  # [S + 1]

    @classmethod
    def of(cls, spans: Sequence[Span]) -> SpanExtents:
        starts, lengths, firsts, tokens = [], [], [0], [0]
        for span in spans:
            for start, length in span.extents_of(0):
                starts.append(start)
                lengths.append(length)
            firsts.append(len(starts))
            tokens.append(span.offset + span.n)
        return cls(*(torch.tensor(values, dtype=torch.long)
                     for values in (starts, lengths, firsts, tokens)))

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.starts, self.lengths, self.firsts, self.tokens


@dataclass(frozen=True, eq=False)  # one step's plan, known by its identity
class AttentionPlan:
    spans: tuple[Span, ...]  # in step order, covering every token; empty in a captured step
    scale: float
    extents: SpanExtents
    num_decode_rows: int = 0  # the first spans are decode rows, one token each

    @classmethod
    def of(cls, spans: Sequence[Span], scale: float, num_decode_rows: int = 0) -> AttentionPlan:
        return cls(tuple(spans), scale, SpanExtents.of(spans), num_decode_rows)

    @property
    def device(self) -> torch.device:
        return self.extents.starts.device

    @functools.cached_property
    def longest_chunk(self) -> int:
        """Tokens in the longest span after the decode rows (the Triton kernels' launch grid)."""
        return max((span.n for span in self.spans[self.num_decode_rows :]), default=0)


@dataclass(frozen=True)
class TorchGather:
    """What torch's path gathers for a step, once for all its layers: the one-token spans
    (decode rows) in one padded batch, (their step offsets [R], key slots [R, L], additive mask
    [R, 1, 1, L]); and each prefill chunk with its keys (context, then its own) and a mask
    [n, L] letting token i see the context and its own keys up to itself."""

    singles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    chunks: tuple[tuple[Span, torch.Tensor, torch.Tensor], ...]


@functools.lru_cache(maxsize=4)  # a plan is one step's: its layers ask for the same gather
def torch_gather(plan: AttentionPlan) -> TorchGather:
    return TorchGather(_gather_singles(plan), _gather_chunks(plan))


def _gather_singles(plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    singles = [span for span in plan.spans if span.n == 1]
    if not singles:
        return None
    slots = [_slots(span.extents_of(0)) for span in singles]
    width = max(len(s) for s in slots)
    index = torch.zeros(len(slots), width, dtype=torch.long)
    mask = torch.full((len(slots), width), float("-inf"))
    for row, row_slots in enumerate(slots):
        index[row, : len(row_slots)] = torch.tensor(row_slots)
        mask[row, : len(row_slots)] = 0
    offsets = torch.tensor([span.offset for span in singles])
    return (offsets.to(plan.device), index.to(plan.device),
            mask[:, None, None, :].to(plan.device))


def _gather_chunks(plan: AttentionPlan) -> tuple[tuple[Span, torch.Tensor, torch.Tensor], ...]:
    prepared = []
    for span in plan.spans:
        if span.n == 1:
            continue
        key_index = torch.tensor(_slots(span.extents_of(span.n - 1)))
        num_context = int(key_index.shape[0]) - span.own_before - span.n
        query_pos = torch.arange(span.n)[:, None] + span.own_before
        key_pos = torch.arange(span.own_before + span.n)[None, :]
        mask = torch.cat([torch.ones(span.n, num_context, dtype=torch.bool),
                          key_pos <= query_pos], dim=1)
        prepared.append((span, key_index.to(plan.device), mask.to(plan.device)))
    return tuple(prepared)


def attend_with_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      plan: AttentionPlan) -> torch.Tensor:
    """q: [T, Hq, D] (rotated) for the step's tokens, whose keys and values are already in the
    pool; keys / values: [Hkv, slots, D] of one layer. Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    gather = torch_gather(plan)
    if gather.singles is not None:
        offsets, index, mask = gather.singles
        row_keys = keys[:, index].transpose(0, 1)  # [R, Hkv, L, D]
        row_values = values[:, index].transpose(0, 1)
        attended = F.scaled_dot_product_attention(
            q[offsets].unsqueeze(2), row_keys, row_values, attn_mask=mask.to(q.dtype),
            scale=plan.scale, enable_gqa=True)
        out[offsets] = attended.squeeze(2)
    for span, key_index, mask in gather.chunks:
        chunk_q = q[span.offset : span.offset + span.n].transpose(0, 1).unsqueeze(0)
        attended = F.scaled_dot_product_attention(
            chunk_q, keys[:, key_index].unsqueeze(0), values[:, key_index].unsqueeze(0),
            attn_mask=mask, scale=plan.scale, enable_gqa=True)
        out[span.offset : span.offset + span.n] = attended[0].transpose(0, 1)
    return out


def _slots(extents: list[Extent]) -> list[int]:
    return [slot for start, length in extents for slot in range(start, start + length)]
