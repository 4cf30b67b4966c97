"""The engine worker: runs `engine.generate` in ONE thread, off the event loop, and hands every
token event back to its request's asyncio queue with `loop.call_soon_threadsafe`.

An exception inside the engine fails the requests of that batch only (each gets an
`EngineFailure`); the thread lives on and serves the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model.engine import GroupedEngine, Member, TokenEvent, Usage

log = logging.getLogger("groupwise.server")


@dataclass(frozen=True)
class EngineFailure:
    """Delivered instead of a final TokenEvent when the engine raised during a batch."""

    member: Member
    message: str


@dataclass(eq=False)
class ServerRequest:
    """One question on its way through the server: its engine member, where its events go,
    and the timestamps the metrics are made of (time.monotonic seconds)."""

    member: Member
    events: asyncio.Queue  # TokenEvent | EngineFailure, in order; shared by a grouped request
    index: int = 0  # the question's index within its HTTP request
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    usage: Usage | None = None

    def __post_init__(self):
        self.member.tag = self  # events name their member; the tag leads back here

    @property
    def is_finished(self) -> bool:
        return self.finished_at is not None


class EngineWorker:
    def __init__(self, engine: GroupedEngine, metrics, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self._metrics = metrics
        self._loop = loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def run(self, groups: list[list[ServerRequest]]) -> None:
        """Runs one batch of groups to completion in the worker thread."""
        await self._loop.run_in_executor(self._executor, self._generate, groups)

    def shutdown(self) -> None:
        """Blocks until the running batch (if any) has ended; call with its members aborted."""
        self._executor.shutdown(wait=True)

    def finish_unscheduled(self, request: ServerRequest) -> None:
        """Ends a request that left the queue before it ran (on the event loop)."""
        prompt_tokens = len(request.member.prompt_ids)
        self.deliver(TokenEvent(request.member, None, "", "abort", Usage(prompt_tokens, 0, 0)))

    def _generate(self, groups: list[list[ServerRequest]]) -> None:  # in the worker thread
        try:
            for event in self.engine.generate([[r.member for r in g] for g in groups]):
                self._post(event)
        except Exception as exc:  # noqa: BLE001 - any engine failure fails this batch only
            log.exception("the engine failed on a batch of %d groups", len(groups))
            message = f"the engine failed while generating: {type(exc).__name__}: {exc}"
            for group in groups:
                for request in group:
                    self._post(EngineFailure(request.member, message))

    def _post(self, item: TokenEvent | EngineFailure) -> None:
        # RuntimeError: the event loop is closed, nobody is left to read the event
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.deliver, item)

    def deliver(self, item: TokenEvent | EngineFailure) -> None:
        """On the event loop: stamps the request, records metrics, queues the item."""
        request: ServerRequest = item.member.tag
        if request.is_finished:  # e.g. a failure reported after the member had ended
            return
        now = time.monotonic()
        if isinstance(item, EngineFailure):
            request.finished_at, request.finish_reason = now, "error"
        else:
            if item.token_id is not None and request.first_token_at is None:
                request.first_token_at = now
                self._metrics.observe_first_token(request)
            if item.finish_reason is not None:
                request.finished_at, request.finish_reason = now, item.finish_reason
                request.usage = item.usage
        if request.is_finished:
            self._metrics.observe_finished(request)
        request.events.put_nowait(item)
