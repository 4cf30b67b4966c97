"""Final hidden states of known sequences (teacher forcing), computed the way the engine computes
prompts: one forward pass over a KV pool, each group's shared prefix once, then each sequence's
rest attending it. Training fits the group head on these states, so what it learns from is what
serving feeds the head."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.engine.kv_pool import KVPool
from model.engine.limits import shared_prefix_length
from model.forward.attention import AttentionPlan, Span
from model.forward.decoder import DecoderForward, StepInputs


@torch.inference_mode()
def teacher_forced_states(forward: DecoderForward, groups: Sequence[Sequence[Sequence[int]]],
                          num_last: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """groups[g][i]: a token sequence (sequences of a group share a prefix, e.g. one passage's
    prompts). Returns, sequence by sequence in order, the final normed hidden states of its
    last num_last[g][i] positions, [num_last[g][i], d]; position p's state predicts token p + 1."""
    device = forward.embed.weight.device
    token_ids: list[int] = []
    positions: list[int] = []
    spans: list[Span] = []
    outputs: list[int] = []
    for sequences, lasts in zip(groups, num_last):
        # the prefix ends before any sequence's first wanted position
        prefix = min(shared_prefix_length(sequences),
                     *(len(s) - n for s, n in zip(sequences, lasts)))
        context = ((len(token_ids), prefix),) if prefix else ()
        if prefix:
            spans.append(Span(len(token_ids), prefix, (), len(token_ids), 0))
            token_ids += sequences[0][:prefix]
            positions += range(prefix)
        for sequence, n in zip(sequences, lasts):
            start = len(token_ids)
            spans.append(Span(start, len(sequence) - prefix, context, start, 0))
            token_ids += sequence[prefix:]
            positions += range(prefix, len(sequence))
            outputs += range(len(token_ids) - n, len(token_ids))
    pool = KVPool(forward.pool_shape, len(token_ids), forward.embed.weight.dtype, device)

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    # every token has its own pool slot, at its index in the step
    step = StepInputs(tensor(token_ids), tensor(positions), tensor(range(len(token_ids))),
                      AttentionPlan.of(spans, forward.scale), tensor(outputs))
    states = forward(step.to(device), pool.kv)
    return list(states.split([n for lasts in num_last for n in lasts]))
