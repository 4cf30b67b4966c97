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

from model.engine.request import EngineInputError, Member, SamplingParams, TokenEvent
from server.prompts import extract_answer, question_messages
from server.question import Question, QuestionEvent
from server.responses import respond
from server.schemas import GroupedCompletionRequest
from server.services import Services
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


async def create_grouped_completion(
    body: GroupedCompletionRequest, http_request: Request, services: Services
):
    services.check_model(body.model)
    questions = await _enqueue(body, http_request.state.tenant, services)
    reply = GroupedReply(services.model_name, body, questions)
    # one queue holds the events of all the request's questions, in order
    return await respond(reply, questions[0].events, body.stream, http_request,
                         services.scheduler)


async def _enqueue(body: GroupedCompletionRequest, tenant: int,
                   services: Services) -> list[Question]:
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                            top_p=body.top_p, seed=body.seed, stop=tuple(body.stop))
    namespace = (tenant, body.cache_salt)
    # one queue: the events of all questions, in order
    events: asyncio.Queue[QuestionEvent] = asyncio.Queue()
    questions = []
    for index, question in enumerate(body.questions):
        messages = question_messages(body.context, question.question, body.system_prompt)
        try:
            prompt_ids = await services.encode(messages, "messages")
        except EngineInputError as exc:
            raise await _name_the_field(exc, body, index, services) from None
        member = Member(prompt_ids, params, namespace=namespace)
        try:
            services.engine.limits.check_member(member)
        except EngineInputError as exc:
            raise await _name_the_field(exc, body, index, services) from None
        questions.append(Question(member, events, index=index))
    size = services.settings.max_group_size
    for start in range(0, len(questions), size):  # the groups the scheduler will form
        services.engine.limits.check_group([q.member for q in questions[start : start + size]])
    services.scheduler.submit_group(questions)
    return questions


async def _name_the_field(error: EngineInputError, body: GroupedCompletionRequest, index: int,
                          services: Services) -> EngineInputError:
    """The engine speaks of a prompt; the client sent a context and questions. A prompt too
    long with any question is the context's fault; otherwise it is this question's."""
    if error.param != "messages":
        return EngineInputError(f"questions[{index}]: {error}", error.param)
    limit = services.engine.limits.max_context
    try:
        bare = len(await services.encode(question_messages(body.context, "",
                                                           body.system_prompt), "context"))
    except EngineInputError:  # too long by its characters alone
        bare = limit
    if bare >= limit:
        return EngineInputError(f"context: {error}", "context")
    field = f"questions[{index}].question"
    return EngineInputError(f"{field}: {error}", field)
