"""How one step's work (the scheduler's rows and prefill chunks) becomes the tensors of one
forward pass: the only place where requests become tensors."""

from __future__ import annotations

import torch

from model.engine.groups import Chunk, Row, extents
from model.forward.attention import AttentionPlan, Span
from model.forward.decoder import StepInputs


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
