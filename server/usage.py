"""Usage as the API reports it: billed prompt tokens (each prompt in full, as if sent alone),
the part served from a group's shared prefix (`cached_tokens`), and what was really computed."""

from __future__ import annotations

from collections.abc import Iterable

from model.engine.interface import Usage


def usage_body(usages: Iterable[Usage | None]) -> dict:
    """The sum of `usages` in OpenAI's shape, plus `computed_prompt_tokens`."""
    prompt = cached = completion = 0
    for usage in usages:
        if usage is not None:
            prompt += usage.prompt_tokens
            cached += usage.cached_tokens
            completion += usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "computed_prompt_tokens": prompt - cached,
    }
