"""The engine worker: ONE thread runs the engine's step loop, off the event loop.

The event loop hands it groups (`submit`); between any two steps the thread adds them to the
engine, which admits them when the KV pool has room. Every step's token events go back to
their requests' asyncio queues in one `loop.call_soon_threadsafe`. A member whose sampling or
stop handling fails gets an `EngineFailure` and its batch-mates carry on; if a whole step
raises, the requests in the engine fail, the engine starts afresh and the thread lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from model.engine import EngineInputError, GroupedEngine, Member, TokenEvent, Usage

log = logging.getLogger("groupwise.server")
_STOP = object()
_FAIL_ALL = object()
SHUTDOWN_MESSAGE = "the server shut down before this answer was complete; retry"


@dataclass(frozen=True)
class EngineFailure:
    """Delivered instead of a final TokenEvent when the engine could not serve a member."""

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
    scheduled_at: float | None = None  # handed to the engine
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
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, group: list[ServerRequest], uses_trained_head: bool) -> None:
        """Queues a group for the engine (from the event loop; never blocks)."""
        self._inbox.put((group, uses_trained_head))

    def fail_all(self, queued: list[ServerRequest]) -> None:
        """A forced shutdown (on the event loop): the queued requests fail now, those in the
        engine at its next step."""
        for request in queued:
            self.deliver(EngineFailure(request.member, SHUTDOWN_MESSAGE))
        self._inbox.put(_FAIL_ALL)

    def shutdown(self) -> None:
        """Aborts everything in the engine and blocks until the thread has ended."""
        self._inbox.put(_STOP)
        self._thread.join()

    def finish_unscheduled(self, request: ServerRequest) -> None:
        """Ends a request that left the queue before it ran (on the event loop)."""
        prompt_tokens = len(request.member.prompt_ids)
        self.deliver(TokenEvent(request.member, None, "", "abort", Usage(prompt_tokens, 0, 0)))

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            items = [self._inbox.get()] if not self.engine.has_work else []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._inbox.get_nowait())
            for item in items:
                if item is _STOP:
                    self._post(list(self.engine.abort_all()))
                    return
                if item is _FAIL_ALL:
                    self._post([EngineFailure(m, SHUTDOWN_MESSAGE) for m in self.engine.reset()])
                    continue
                self._add(*item)
            self._step()

    def _add(self, group: list[ServerRequest], uses_trained_head: bool) -> None:
        try:
            self.engine.add([r.member for r in group], uses_trained_head)
        except EngineInputError as exc:  # the HTTP side checked it; a last line of defence
            self._post([EngineFailure(r.member, str(exc)) for r in group])

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a failed step fails what is in the engine
            log.exception("an engine step failed")
            message = f"the engine failed while generating: {type(exc).__name__}: {exc}"
            events = [EngineFailure(m, message) for m in self.engine.reset()]
        self._post(events)
        self._metrics.observe_engine(self.engine)

    def _post(self, items: list) -> None:
        if not items:
            return
        # RuntimeError: the event loop is closed, nobody is left to read the events
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver_all, items)

    # --- back on the event loop --------------------------------------------------------------

    def _deliver_all(self, items: list) -> None:
        for item in items:
            self.deliver(item)

    def deliver(self, item: TokenEvent | EngineFailure) -> None:
        """Stamps the request, records metrics, queues the item."""
        if isinstance(item, TokenEvent) and item.finish_reason == "error":
            item = EngineFailure(item.member, f"the engine failed on this request: {item.error}")
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
