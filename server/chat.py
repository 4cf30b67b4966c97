"""POST /v1/chat/completions: OpenAI's request and response shapes, streamed or not.

One chat request is one question; it joins a group through the `group_id` hint (body field or
`X-Group-Id` header) or a long shared prompt prefix, and leaves it if its client disconnects.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from model.engine import Member, TokenEvent
from model.sampling import SamplingParams
from server.errors import ClientDisconnected, error_body
from server.schemas import ChatCompletionRequest
from server.services import Services
from server.streaming import (
    SSE_DONE,
    SSE_HEADERS,
    DisconnectWatcher,
    engine_error,
    next_item,
    release,
    sse_event,
)
from server.usage import usage_body
from server.worker import EngineFailure, ServerRequest

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
    """Builds the response objects of one chat completion."""

    def __init__(self, model_name: str, include_usage: bool):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.include_usage = include_usage

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, text: str, event: TokenEvent) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": event.finish_reason}
        return {**self._base("chat.completion"), "choices": [choice],
                "usage": usage_body([event.usage])}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._base("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # as OpenAI: only the last chunk carries usage
        return body

    def usage_chunk(self, event: TokenEvent) -> dict:
        return {**self._base("chat.completion.chunk"), "choices": [],
                "usage": usage_body([event.usage])}


async def create_chat_completion(
    body: ChatCompletionRequest, http_request: Request, services: Services
):
    services.check_model(body.model)
    request = await _enqueue(body, http_request.headers.get("x-group-id"),
                             http_request.state.tenant, services)
    watcher = DisconnectWatcher(http_request.receive)
    reply = ChatReply(services.model_name, body.includes_usage_chunk)
    scheduler = services.scheduler
    try:
        first = await next_item(request.events, watcher)
        if isinstance(first, EngineFailure):
            raise engine_error(first)
        if not body.stream:
            return JSONResponse(await _collect(first, request, watcher, reply))
    except BaseException:
        release(scheduler, [request], watcher)
        raise
    stream = _stream(first, request, watcher, reply, scheduler)
    return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)


async def _enqueue(body: ChatCompletionRequest, header_hint: str | None, tenant: int,
                   services: Services):
    """Tokenizes, validates (EngineInputError -> 400) and queues (QueueFullError -> 429).
    The tenant and the cache salt scope both the prefix cache and the group hint."""
    messages = [message.as_template_message() for message in body.messages]
    prompt_ids = await services.encode(messages, "messages")
    # a default max_tokens must fit both the context and the whole KV cache
    room = min(services.engine.max_context, services.engine.pool.capacity)
    params = sampling_params(body, len(prompt_ids), room)
    namespace = (tenant, body.cache_salt)
    member = Member(prompt_ids, params, namespace=namespace)
    services.engine.check_group([member])
    request = ServerRequest(member, asyncio.Queue())
    hint = body.group_id or header_hint
    services.scheduler.submit(request, (namespace, hint) if hint else None)
    return request


async def _collect(item, request: ServerRequest, watcher, reply: ChatReply) -> dict:
    parts = []
    while True:
        if isinstance(item, EngineFailure):
            raise engine_error(item)
        parts.append(item.text)
        if item.finish_reason is not None:
            watcher.close()
            return reply.completion("".join(parts), item)
        item = await next_item(request.events, watcher)


async def _stream(item, request: ServerRequest, watcher, reply: ChatReply,
                  scheduler) -> AsyncIterator[bytes]:
    try:
        yield sse_event(reply.chunk({"role": "assistant", "content": ""}))
        while True:
            if isinstance(item, EngineFailure):  # headers are sent: report it in the stream
                yield sse_event(error_body(500, item.message, code="engine_error"))
                return
            if item.text:
                yield sse_event(reply.chunk({"content": item.text}))
            if item.finish_reason is not None:
                yield sse_event(reply.chunk({}, item.finish_reason))
                if reply.include_usage:
                    yield sse_event(reply.usage_chunk(item))
                yield SSE_DONE
                return
            item = await next_item(request.events, watcher)
    except ClientDisconnected:
        return
    finally:
        release(scheduler, [request], watcher)
