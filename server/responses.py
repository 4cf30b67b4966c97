"""The response loop both completion endpoints share: read a request's events, answer with one
JSON body or an SSE stream, and release what the client no longer waits for. Each endpoint
supplies only its response shapes, as a `Reply`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from model.engine.interface import TokenEvent
from server.dispatcher import Dispatcher
from server.errors import ClientDisconnected, error_body
from server.question import EngineFailure, Question, QuestionEvent
from server.streaming import (
    SSE_DONE,
    SSE_HEADERS,
    DisconnectWatcher,
    engine_error,
    next_item,
    release,
    sse_event,
)


class Reply(Protocol):
    """The response shapes of one endpoint, fed the request's events in order."""

    questions: list[Question]  # the request's, in its order

    @property
    def is_done(self) -> bool:
        """Every question's final event has been read."""

    def add(self, event: TokenEvent) -> list[dict]:
        """Takes in one event; returns the stream chunks it makes (maybe none)."""

    def opening(self) -> list[dict]:
        """Stream chunks sent before the first event's."""

    def closing(self) -> list[dict]:
        """Stream chunks sent after the last event's, before [DONE]."""

    def completion(self) -> dict:
        """The non-streamed response body, once done."""


async def respond(reply: Reply, events: asyncio.Queue[QuestionEvent], stream: bool,
                  http_request: Request, dispatcher: Dispatcher):
    """Waits for the first event before answering, so that a failure ahead of any output is an
    HTTP error rather than a stream that breaks off. Unfinished questions are aborted as soon as
    the client has gone, the handler fails, or the stream ends early."""
    watcher = DisconnectWatcher(http_request.receive)
    try:
        first = await next_item(events, watcher)
        if isinstance(first, EngineFailure):
            raise engine_error(first)
        if not stream:
            return JSONResponse(await _collect(first, events, watcher, reply))
    except BaseException:
        release(dispatcher, reply.questions, watcher)
        raise
    chunks = _stream(first, events, watcher, reply, dispatcher)
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


async def _collect(item: QuestionEvent, events: asyncio.Queue[QuestionEvent],
                   watcher: DisconnectWatcher, reply: Reply) -> dict:
    while True:
        if isinstance(item, EngineFailure):
            raise engine_error(item)
        reply.add(item)
        if reply.is_done:
            watcher.close()
            return reply.completion()
        item = await next_item(events, watcher)


async def _stream(item: QuestionEvent, events: asyncio.Queue[QuestionEvent],
                  watcher: DisconnectWatcher, reply: Reply,
                  dispatcher: Dispatcher) -> AsyncIterator[bytes]:
    try:
        for chunk in reply.opening():
            yield sse_event(chunk)
        while True:
            if isinstance(item, EngineFailure):  # headers are sent: report it in the stream
                yield sse_event(error_body(500, item.message, code="engine_error"))
                return
            for chunk in reply.add(item):
                yield sse_event(chunk)
            if reply.is_done:
                for chunk in reply.closing():
                    yield sse_event(chunk)
                yield SSE_DONE
                return
            item = await next_item(events, watcher)
    except ClientDisconnected:
        return
    finally:
        release(dispatcher, reply.questions, watcher)
