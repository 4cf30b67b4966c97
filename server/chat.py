"""POST /v1/chat/completions: OpenAI's request and response shapes, streamed or not.

One chat request is one question. With a `group_id` hint (body field or `X-Group-Id` header) it
joins the group of that name; without one it runs at once, sharing any prompt prefix already
computed through the prefix cache. It leaves its group if its client disconnects.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request

from model.engine.interface import TokenEvent
from server.dispatcher import Dispatcher
from server.intake import chat_member
from server.question import Question
from server.responses import respond
from server.schemas import ChatCompletionRequest
from server.services import ServedModel
from server.usage import usage_body


class ChatReply:
    """The response shapes of one chat completion (one question)."""

    def __init__(self, model_name: str, include_usage: bool, question: Question):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.include_usage = include_usage
        self.questions = [question]
        self.parts: list[str] = []
        self.final: TokenEvent | None = None  # the event that finished it

    @property
    def is_done(self) -> bool:
        return self.final is not None

    def add(self, event: TokenEvent) -> list[dict]:
        self.parts.append(event.text)
        chunks = [self._chunk({"content": event.text})] if event.text else []
        if event.finish_reason is not None:
            self.final = event
            chunks.append(self._chunk({}, event.finish_reason))
        return chunks

    def opening(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def closing(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self._base("chat.completion.chunk"), "choices": [],
                 "usage": usage_body([self._last.usage])}]

    def completion(self) -> dict:
        message = {"role": "assistant", "content": "".join(self.parts)}
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": self._last.finish_reason}
        return {**self._base("chat.completion"), "choices": [choice],
                "usage": usage_body([self._last.usage])}

    @property
    def _last(self) -> TokenEvent:
        assert self.final is not None, "read before the last event"
        return self.final

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._base("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: only the last chunk carries usage
        return body


async def create_chat_completion(body: ChatCompletionRequest, http_request: Request,
                                 model: ServedModel, dispatcher: Dispatcher):
    """Checks and queues the request (EngineInputError -> 400, QueueFullError -> 429), then
    answers it. The tenant and the cache salt scope both the prefix cache and the group hint."""
    model.check_name(body.model)
    namespace = (http_request.state.tenant, body.cache_salt)
    question = Question(await chat_member(body, namespace, model), asyncio.Queue())
    hint = body.group_id or http_request.headers.get("x-group-id")
    dispatcher.submit(question, (namespace, hint) if hint else None)
    reply = ChatReply(model.name, body.includes_usage_chunk, question)
    return await respond(reply, question.events, bool(body.stream), http_request, dispatcher)
