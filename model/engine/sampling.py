"""Per-request sampling: greedy or temperature / top-k / top-p with a per-request seed (the
params themselves are in `model.engine.request`), and the tokens a row writes after verifying a
proposal."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.engine.request import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private RNG per request, so its samples do not depend on what it is batched with."""
    if params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """logits: [vocab] for one row. Returns the next token id."""
    if params.is_greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already cover top_p; the first always stays
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_chooser(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None, greedy: list[int]) -> Callable[[int], int]:
    """Position -> the token a row writes there, from its logits [positions, vocab], as it
    would write it one token a step: the argmax (`greedy`, computed for the whole step at
    once), or a draw from its own generator."""
    if params.is_greedy:
        return greedy.__getitem__
    return lambda index: sample_token(logits[index], params, generator)


def accept(proposal: list[int], choose: Callable[[int], int]) -> list[int]:
    """The tokens a row writes after verifying `proposal`: `choose(i)`, the token it writes at
    position i, asked in order while it agrees with the proposal, and once more after. A row
    thus writes exactly what it would write token by token, drawing once per written token in
    the same order; for a sampled row this is the rejection rule for a fixed proposal x
    (accepted with probability p(x), else a draw from p without x, renormalized)."""
    written = []
    for index, proposed in enumerate(proposal):
        written.append(choose(index))
        if written[-1] != proposed:
            return written
    written.append(choose(len(proposal)))
    return written
