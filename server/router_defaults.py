"""The fields the cache-aware router in front of the replicas (vllm-router 0.1.17,
deploy/router) writes into every chat request it passes on.

The router parses each chat request into its own request type and sends that on with its
defaults written out: `"skip_special_tokens": true, "no_stop_trim": false, ...`. Those values
ask for what this server does anyway, so they are accepted; any other value would ask for
something it does not do, and is refused like any other unsupported field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator


def _only(value: bool) -> BeforeValidator:
    def check(given):
        if given is not None and given is not value:
            raise ValueError(f"only {str(value).lower()} is supported")
        return given

    return BeforeValidator(check)


OnlyFalse = Annotated[bool | None, _only(False)]
OnlyTrue = Annotated[bool | None, _only(True)]


class RouterDefaults(BaseModel):
    no_stop_trim: OnlyFalse = None
    continue_final_message: OnlyFalse = None
    return_hidden_states: OnlyFalse = None
    skip_special_tokens: OnlyTrue = None
    separate_reasoning: OnlyTrue = None
    stream_reasoning: OnlyTrue = None
    include_reasoning: OnlyTrue = None
