"""Decode steps replayed from CUDA graphs: one captured forward per batch size (bucket), fed from
static input buffers.

A decode step on a GPU launches a few hundred small kernels; launched one by one from Python,
the GPU waits on the host most of the step. Captured once, a step is one graph launch. The
forward is captured for bucket sizes 1, 2, 4, 8, then steps of 16 up to `max_rows`; a step with
n decode rows replays the smallest bucket >= n, its rows first, then padding rows. A padding
row is a sequence of one token that lives in the pool's scratch slot: it writes its key and
value there, attends that one key, and is never read, so no live slot is touched. Prefill
steps (their sizes vary without bound), steps with more rows or more cache extents than the
buffers hold, and the group head, LM head and sampling run outside the graphs.

Every kernel computes each row on its own, so a row's output is the same in any bucket: a
replayed step equals the eager one.
"""

from __future__ import annotations

import logging
import time

import torch

from model.forward.attention import AttentionPlan, SpanExtents
from model.forward.decoder import DecoderForward, StepInputs

log = logging.getLogger(__name__)

EXTENTS_PER_ROW = 16  # cache nodes on a row's path, plus its own run, the buffers hold


def bucket_sizes(max_rows: int) -> list[int]:
    small = [size for size in (1, 2, 4, 8) if size < max_rows]
    return small + list(range(16, max_rows, 16)) + [max_rows]


class DecodeGraphs:
    """`run(step)` for decode-only steps that `fits`: the step's inputs are copied into the
    static buffers, padded to a bucket, and the bucket's graph replays. With `capture` False
    (a CPU, or a check of the padding) the same padded step runs eagerly instead."""

    def __init__(self, forward: DecoderForward, kv: torch.Tensor, scratch_slot: int,
                 max_rows: int, capture: bool = True):
        self.forward, self.kv, self.scratch_slot = forward, kv, scratch_slot
        self.sizes = bucket_sizes(max_rows)
        self.max_rows, self.max_extents = max_rows, max_rows * EXTENTS_PER_ROW
        # token ids, positions, slots (max_rows each); extent starts and lengths (max_extents
        # each); each row's first extent (max_rows + 1): one buffer, so inputs arrive in one copy
        widths = [max_rows] * 3 + [self.max_extents] * 2 + [max_rows + 1]
        device = kv.device
        self.static = torch.zeros(sum(widths), dtype=torch.long, device=device)
        self.staging = torch.zeros(sum(widths), dtype=torch.long,
                                   pin_memory=device.type == "cuda")
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self.token_ids, self.positions, self.slots, self.starts, self.lengths, self.firsts = (
            self.static.split(widths))
        self.staged = self.staging.split(widths)
        self.rows = torch.arange(max_rows + 1, device=device)  # output index; span tokens
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    def fits(self, step: StepInputs) -> bool:
        num_rows = step.num_decode_rows
        return (0 < num_rows <= self.max_rows and step.token_ids.shape[0] == num_rows
                and step.plan.extents.starts.shape[0] + self.max_rows <= self.max_extents)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Final hidden states [n, d] of the step's n decode rows (host-side inputs that
        `fits`). After a replay they are a view of the graph's output: read them before the
        next step."""
        num_rows = step.num_decode_rows
        size = next(size for size in self.sizes if size >= num_rows)
        self._stage(step, size)
        if size in self.graphs:
            graph, output = self.graphs[size]
            graph.replay()
            return output[:num_rows]
        return self.forward(self._static_step(size), self.kv)[:num_rows]

    def _stage(self, step: StepInputs, size: int) -> None:
        """The step's rows, then padding rows up to `size`, into the static buffers."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the staging buffer
        token_ids, positions, slots, starts, lengths, firsts = self.staged
        num_rows = step.num_decode_rows
        extents = step.plan.extents
        num_extents = extents.starts.shape[0]
        for buffer, values, padding in ((token_ids, step.token_ids, 0),
                                        (positions, step.positions, 0),
                                        (slots, step.slots, self.scratch_slot)):
            buffer[:num_rows] = values
            buffer[num_rows:size] = padding
        # each padding row: one extent, the scratch slot (its own key)
        starts[:num_extents] = extents.starts
        starts[num_extents : num_extents + size - num_rows] = self.scratch_slot
        lengths[:num_extents] = extents.lengths
        lengths[num_extents : num_extents + size - num_rows] = 1
        firsts[: num_rows + 1] = extents.firsts
        firsts[num_rows + 1 : size + 1] = torch.arange(num_extents + 1,
                                                       num_extents + 1 + size - num_rows)
        self.static.copy_(self.staging, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _static_step(self, size: int) -> StepInputs:
        extents = SpanExtents(self.starts, self.lengths, self.firsts[: size + 1],
                              self.rows[: size + 1])
        plan = AttentionPlan((), self.forward.scale, extents, num_decode_rows=size)
        return StepInputs(self.token_ids[:size], self.positions[:size], self.slots[:size],
                          plan, self.rows[:size])

    def _capture(self) -> None:
        began = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # the largest first: the rest reuse its memory
            self._stage(_padding_only(size), size)
            step = self._static_step(size)
            self.forward(step, self.kv)  # compiles the kernels and settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self.forward(step, self.kv)
            pool = graph.pool()
            self.graphs[size] = (graph, output)
        torch.cuda.synchronize()
        log.info("captured decode graphs for %d batch sizes up to %d rows in %.1f s",
                 len(self.sizes), self.max_rows, time.perf_counter() - began)


def _padding_only(size: int) -> StepInputs:
    """A step with no rows of its own: staged, it is `size` padding rows."""
    empty = torch.zeros(0, dtype=torch.long)
    extents = SpanExtents(empty, empty, torch.zeros(1, dtype=torch.long), empty)
    plan = AttentionPlan((), 1.0, extents, num_decode_rows=0)
    return StepInputs(empty, empty, empty, plan, empty)
