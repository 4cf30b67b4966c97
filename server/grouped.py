"""POST /v1/grouped_completions: one context, many questions, answered as one group.

Each question's prompt is the answer-in-tags system prompt (or the caller's) + the passage +
the question, so the questions share the system prompt and passage as a token prefix that the
engine computes once. A request's questions form their own group(s), split at max_group_size.

Streaming (`"stream": true`) sends SSE events of object `grouped_completion.chunk`, each with
an `answers` list holding one entry `{"index", "id", "delta", "finish_reason"}`; a question's
last entry also carries its `text`, `answer` and `usage`. A final chunk with `"answers": []`
carries the request's `usage`, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request

from model.engine.interface import TokenEvent
from server.dispatcher import Dispatcher
from server.intake import grouped_members
from server.prompts import extract_answer
from server.question import Question, QuestionEvent
from server.responses import respond
from server.schemas import GroupedCompletionRequest
from server.services import ServedModel
from server.usage import usage_body


class GroupedReply:
    """Accumulates the answers of one grouped request and builds its response objects."""

    def __init__(self, model_name: str, body: GroupedCompletionRequest,
                 questions: list[Question]):
        self.id = f"grpcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.body = body
        self.questions = questions
        self._by_member = {q.member: q for q in questions}  # events name their member
        self.texts = [""] * len(questions)
        # final events read so far; not `question.is_finished`, which turns true when the final
        # event is queued, possibly before the events ahead of it were read
        self.num_answered = 0

    @property
    def is_done(self) -> bool:
        return self.num_answered == len(self.questions)

    def add(self, event: TokenEvent) -> list[dict]:
        """Appends an event's text; streams the question's answer entry when it says something."""
        question = self._by_member[event.member]
        self.texts[question.index] += event.text
        entry = {"index": question.index, "id": self.body.question_id(question.index),
                 "delta": event.text, "finish_reason": event.finish_reason}
        if event.finish_reason is not None:
            self.num_answered += 1
            entry.update(self._answer(question))
        return [self._chunk(entry)] if entry["delta"] or entry["finish_reason"] else []

    def opening(self) -> list[dict]:
        return []

    def closing(self) -> list[dict]:
        return [{**self._chunk(None), "usage": usage_body(q.usage for q in self.questions),
                 "timings": self._timings()}]

    def _answer(self, question: Question) -> dict:
        text = self.texts[question.index]
        return {"index": question.index, "id": self.body.question_id(question.index),
                "text": text, "answer": extract_answer(text),
                "finish_reason": question.finish_reason, "usage": usage_body([question.usage])}

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self) -> dict:
        return {**self._base("grouped_completion"),
                "answers": [self._answer(q) for q in self.questions],
                "usage": usage_body(q.usage for q in self.questions),
                "timings": self._timings()}

    def _chunk(self, entry: dict | None) -> dict:
        return {**self._base("grouped_completion.chunk"), "answers": [entry] if entry else []}

    def _timings(self) -> dict:
        arrived = min(q.arrived_at for q in self.questions)
        started = [q.scheduled_at for q in self.questions if q.scheduled_at is not None]
        finished = max(q.finished_at or arrived for q in self.questions)
        return {"queue_seconds": round(max(started, default=arrived) - arrived, 6),
                "total_seconds": round(finished - arrived, 6)}


async def create_grouped_completion(body: GroupedCompletionRequest, http_request: Request,
                                    model: ServedModel, dispatcher: Dispatcher,
                                    max_group_size: int):
    model.check_name(body.model)
    namespace = (http_request.state.tenant, body.cache_salt)
    groups = await grouped_members(body, namespace, model, max_group_size)
    # one queue holds the events of all the request's questions, in order
    events: asyncio.Queue[QuestionEvent] = asyncio.Queue()
    members = [member for group in groups for member in group]
    questions = [Question(member, events, index=index) for index, member in enumerate(members)]
    by_member = {q.member: q for q in questions}
    dispatcher.submit_groups([[by_member[m] for m in group] for group in groups])
    reply = GroupedReply(model.name, body, questions)
    return await respond(reply, events, body.stream, http_request, dispatcher)
