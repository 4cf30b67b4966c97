"""Per-request sampling: greedy or temperature / top-k / top-p with a per-request seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy, as vLLM: dividing by them overflows
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as OpenAI's seed


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 96
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # generate until max_tokens (benchmarks), as vLLM's extension

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with these params, as (field, reason) pairs (empty if valid)."""
        found = []
        if self.max_tokens < 1:
            found.append(("max_tokens", f"must be at least 1, got {self.max_tokens}"))
        if self.temperature < 0:
            found.append(("temperature", f"must be >= 0, got {self.temperature}"))
        if not 0 < self.top_p <= 1:
            found.append(("top_p", f"must be in (0, 1], got {self.top_p}"))
        if self.top_k < 0:
            found.append(("top_k", f"must be >= 0, got {self.top_k}"))
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            found.append(("seed", f"must be a 64-bit signed integer, got {self.seed}"))
        if any(not s for s in self.stop):
            found.append(("stop", "stop strings must not be empty"))
        return found


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
