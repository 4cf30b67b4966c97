"""What the engine is asked and what it answers: a `Member` (one question of a group) with its
`SamplingParams`, and the `TokenEvent`s it produces, ending with its `Usage`. Torch-free: these
are the messages that cross the door between the server and the engine."""

from __future__ import annotations

import enum
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # temperatures under this are greedy, as vLLM: dividing by them overflows
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as OpenAI's seed


class EngineInputError(ValueError):
    """A request the engine cannot serve as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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


class Status(enum.Enum):
    """How far the engine got with a member. Only the engine's thread writes it."""

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


@dataclass(frozen=True)
class EngineCounters:
    """The engine's state after a step, as its metrics and its queue limit read it."""

    num_waiting: int  # members added, not admitted yet (the KV pool has no room for them)
    kv_cache_usage: float  # share of the pool held by running sequences (not evictable prefixes)
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache, since the start
    prefix_cache_hits: int  # of those, tokens served from it (or from a group's shared prefix)
    num_row_steps: int = 0  # decode steps of a row (a row in a step), since the start
    num_decode_tokens: int = 0  # tokens they wrote (more than one a step with speculation)
    num_drafts: int = 0  # proposals verified
    num_draft_tokens: int = 0  # tokens proposed in them
    num_accepted_tokens: int = 0  # of those, the ones written

    def tokens_per_row_step_since(self, earlier: EngineCounters) -> float:
        """Decode tokens a row wrote per step since `earlier`: 1 without speculation."""
        row_steps = self.num_row_steps - earlier.num_row_steps
        return (self.num_decode_tokens - earlier.num_decode_tokens) / max(row_steps, 1)
