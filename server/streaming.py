"""Reading a request's events on the event loop, noticing when its client has gone, and SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.types import Receive

from server.dispatcher import Dispatcher
from server.errors import APIError, ClientDisconnected
from server.question import EngineFailure, Question, QuestionEvent

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
SSE_DONE = b"data: [DONE]\n\n"


class DisconnectWatcher:
    """Waits for the ASGI `http.disconnect` message in the background. The request body has
    already been read, so the next message the server sends is the disconnect."""

    def __init__(self, receive: Receive):
        self.task = asyncio.create_task(self._watch(receive))

    @staticmethod
    async def _watch(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    def close(self) -> None:
        self.task.cancel()


async def next_item(events: asyncio.Queue[QuestionEvent],
                    watcher: DisconnectWatcher) -> QuestionEvent:
    """The next TokenEvent or EngineFailure; raises ClientDisconnected if the client left first."""
    if not events.empty():
        return events.get_nowait()
    getter = asyncio.ensure_future(events.get())
    try:
        done, _ = await asyncio.wait({getter, watcher.task},
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # e.g. the server cancels a stream whose client left
        getter.cancel()
        raise
    if getter in done:
        return getter.result()
    getter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await getter
    raise ClientDisconnected()


def engine_error(failure: EngineFailure) -> APIError:
    return APIError(500, failure.message, code="engine_error")


def sse_event(data: dict) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def release(dispatcher: Dispatcher, questions: list[Question], watcher: DisconnectWatcher) -> None:
    """The HTTP side is done with `questions`: unfinished ones (their client left, or the
    handler failed) are aborted, so they leave their group without disturbing it."""
    watcher.close()
    for question in questions:
        if not question.is_finished:
            dispatcher.abort(question)
