"""What the engine is asked and what it answers: a `Member` (one question of a group) and the
`TokenEvent`s it produces, ending with its `Usage`."""

from __future__ import annotations

import enum
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

from model.engine.sampling import SamplingParams


class EngineInputError(ValueError):
    """A request the engine cannot serve as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Status(enum.Enum):
    WAITING = "waiting"  # added, not admitted yet (the KV pool has no room for its group)
    PREFILL = "prefill"  # admitted: its prompt is being computed
    DECODE = "decode"  # generating
    FINISHED = "finished"


@dataclass(eq=False)
class Member:
    """One question of a group: its prompt, its sampling params and a handle for the caller.

    `namespace` scopes the prefix cache (tenant, cache salt): prompts match only cached
    prefixes of the same namespace."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    tag: object = None  # echoed back in events, for the caller to route them
    namespace: Hashable = None
    status: Status = Status.WAITING
    _aborted: threading.Event = field(default_factory=threading.Event, repr=False)

    def abort(self) -> None:
        """Thread-safe: the member finishes at the next step with reason "abort"."""
        self._aborted.set()

    @property
    def is_aborted(self) -> bool:
        return self._aborted.is_set()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # the whole prompt: what an API bills
    cached_tokens: int  # prompt tokens served from the prefix cache or the group's shared prefix
    completion_tokens: int

    @property
    def computed_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class TokenEvent:
    member: Member
    token_id: int | None  # None when a member ends without a new token (abort, error)
    text: str  # newly released text, possibly empty
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on the last event
    usage: Usage | None = None  # on a member's last event
    error: str | None = None  # what went wrong, with finish_reason "error"
