"""One question on its way through the server, and what its client is sent about it.

A `Question` is the server's side of one question: a chat request holds one, a grouped request
one per question, sharing one events queue. Its engine `Member` is what the engine is handed;
how far the engine got is the engine thread's to know, and comes back only as events.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from model.engine.interface import Member, TokenEvent, Usage


class QuestionStatus(enum.Enum):
    QUEUED = "queued"  # in the grouping's queue, or about to be handed over
    IN_ENGINE = "in_engine"  # handed to the engine worker
    FINISHED = "finished"  # its final event or failure has been queued for its client


@dataclass(frozen=True)
class EngineFailure:
    """Delivered instead of a final TokenEvent when the engine could not serve a member."""

    member: Member
    message: str


QuestionEvent = TokenEvent | EngineFailure


@dataclass(eq=False)
class Question:
    """Its engine member, where its events go, and the timestamps the metrics are made of
    (time.monotonic seconds). `status` moves forward only: the dispatcher hands it to the engine
    (`hand_to_engine`), the engine worker finishes it (`finish`) when it queues its last event."""

    member: Member
    events: asyncio.Queue[QuestionEvent]  # in order; one queue shared by a grouped request
    index: int = 0  # the question's index within its HTTP request
    status: QuestionStatus = QuestionStatus.QUEUED
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # handed to the engine
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    usage: Usage | None = None  # None when it failed

    @property
    def is_finished(self) -> bool:
        return self.status is QuestionStatus.FINISHED

    def hand_to_engine(self, now: float) -> None:
        self.status, self.scheduled_at = QuestionStatus.IN_ENGINE, now

    def finish(self, now: float, reason: str, usage: Usage | None = None) -> None:
        self.status, self.finished_at = QuestionStatus.FINISHED, now
        self.finish_reason, self.usage = reason, usage
