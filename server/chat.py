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

from model.engine.request import Member, SamplingParams, TokenEvent
from server.question import Question
from server.responses import respond
from server.schemas import ChatCompletionRequest
from server.services import Services
from server.usage import usage_body

DEFAULT_MAX_TOKENS = 256  # when the request sets neither max_tokens nor max_completion_tokens
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


def sampling_params(body: ChatCompletionRequest, prompt_length: int, max_context: int):
    max_tokens = body.requested_max_tokens
    if max_tokens is None:  # a default must not push a fitting prompt past the context
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, max_context - prompt_length))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        ignore_eos=bool(body.ignore_eos),
        seed=body.seed,
        stop=tuple(body.stop),
    )


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
                 "usage": usage_body([self.final.usage])}]

    def completion(self) -> dict:
        message = {"role": "assistant", "content": "".join(self.parts)}
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": self.final.finish_reason}
        return {**self._base("chat.completion"), "choices": [choice],
                "usage": usage_body([self.final.usage])}

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._base("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: only the last chunk carries usage
        return body


async def create_chat_completion(
    body: ChatCompletionRequest, http_request: Request, services: Services
):
    services.check_model(body.model)
    question = await _enqueue(body, http_request.headers.get("x-group-id"),
                              http_request.state.tenant, services)
    reply = ChatReply(services.model_name, body.includes_usage_chunk, question)
    return await respond(reply, question.events, body.stream, http_request, services.scheduler)


async def _enqueue(body: ChatCompletionRequest, header_hint: str | None, tenant: int,
                   services: Services) -> Question:
    """Tokenizes, validates (EngineInputError -> 400) and queues (QueueFullError -> 429).
    The tenant and the cache salt scope both the prefix cache and the group hint."""
    prompt_ids = await encode_prompt(body, services)
    # a default max_tokens must fit both the context and the whole KV cache
    limits = services.engine.limits
    room = min(limits.max_context, limits.kv_capacity)
    params = sampling_params(body, len(prompt_ids), room)
    namespace = (tenant, body.cache_salt)
    member = Member(prompt_ids, params, namespace=namespace)
    limits.check_group([member])
    question = Question(member, asyncio.Queue())
    hint = body.group_id or header_hint
    services.scheduler.submit(question, (namespace, hint) if hint else None)
    return question


async def encode_prompt(body: ChatCompletionRequest, services: Services) -> list[int]:
    """The token ids of the request's prompt: its messages in the model's chat template."""
    messages = [message.as_template_message() for message in body.messages]
    return await services.encode(messages, "messages")
