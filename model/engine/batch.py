"""How one step's work (the scheduler's rows and prefill chunks) becomes the tensors of one
forward pass: the only place where requests become tensors."""

from __future__ import annotations

import torch

from model.engine.groups import Row, extents
from model.engine.scheduler import StepWork
from model.forward.attention import AttentionPlan, Span
from model.forward.decoder import StepInputs


def build_step(work: StepWork, scale: float) -> tuple[StepInputs, list[Row]]:
    """The forward's inputs for one step, on the CPU -> (inputs, decoding rows in the order
    they run). Rows that decode one token come first, sorted by their cache path so that rows
    sharing a prefix are neighbours (attention finds their keys in cache); then each row that
    verifies a proposal, its last token and the proposal as a chunk of its sequence; then each
    prefill chunk. Outputs: every position of the decoding rows, then the last token of each
    chunk that completes a row's prompt."""
    def path_order(rows: list[Row]) -> list[Row]:
        return sorted(rows, key=lambda r: [n.serial for n in r.leaf.path()])

    plain = path_order([r for r in work.decode_rows if r not in work.proposals])
    verifying = path_order([r for r in work.decode_rows if r in work.proposals])
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    spans: list[Span] = []
    outputs: list[int] = []
    # a row attends its path's nodes, then its own tokens including those fed now (every
    # token's key and value are written to the pool before attention)
    for row in [*plain, *verifying]:
        fed = [row.output_ids[-1], *work.proposals.get(row, ())]
        outputs += range(len(token_ids), len(token_ids) + len(fed))
        spans.append(Span(len(token_ids), len(fed), extents(row.leaf), row.tail_start,
                          row.num_fed))
        token_ids += fed
        positions += range(row.next_position, row.next_position + len(fed))
        slots += range(row.tail_start + row.num_fed, row.tail_start + row.num_fed + len(fed))
    for chunk in work.chunks:
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

    plan = AttentionPlan.of(spans, scale, num_decode_rows=len(plain))
    return StepInputs(tensor(token_ids), tensor(positions), tensor(slots), plan,
                      tensor(outputs)), plain + verifying
