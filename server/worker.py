"""The engine worker: ONE thread runs the engine's step loop, off the event loop.

The event loop hands it groups (`submit`); between any two steps the thread adds them to the
engine, which admits them when the KV pool has room. After every step the thread sends the
step's token events, and how many members still wait for room, back to the event loop in one
`loop.call_soon_threadsafe`: the event loop never reads the engine itself. A member whose
sampling or stop handling fails gets an `EngineFailure` and its batch-mates carry on; if a whole
step raises, the questions in the engine fail, the engine starts afresh and the thread lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Protocol

from model.engine.interface import Engine, EngineCounters, Member, TokenEvent, Usage
from server.question import EngineFailure, Question, QuestionEvent

log = logging.getLogger("groupwise.server")
_STOP = object()
_FAIL_ALL = object()
SHUTDOWN_MESSAGE = "the server shut down before this answer was complete; retry"


class WorkerMetrics(Protocol):
    def observe_engine(self, counters: EngineCounters) -> None: ...

    def observe_first_token(self, question: Question) -> None: ...

    def observe_finished(self, question: Question) -> None: ...


class EngineWorker:
    def __init__(self, engine: Engine, metrics: WorkerMetrics, loop: asyncio.AbstractEventLoop):
        self._engine = engine
        self._metrics = metrics
        self._loop = loop
        # the engine's events name members; this leads them to their questions. Only the event
        # loop touches it: filled on submit, emptied as questions finish.
        self._questions: dict[Member, Question] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._num_submitted = 0  # members handed to the thread (event loop)
        self._num_taken = 0  # of those, members the thread has given the engine (thread)
        self._reported = (0, 0)  # (taken, waiting in the engine) after the last step
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        """Members handed over and not admitted yet, as of the engine's last step."""
        taken, waiting = self._reported
        return self._num_submitted - taken + waiting

    def submit(self, group: list[Question], uses_trained_head: bool) -> None:
        """Queues a group for the engine (from the event loop; never blocks)."""
        for question in group:
            self._questions[question.member] = question
        self._num_submitted += len(group)
        self._inbox.put(([q.member for q in group], uses_trained_head))

    def fail_all(self, queued: list[Question]) -> None:
        """A forced shutdown (on the event loop): the queued questions fail now, those in the
        engine at its next step."""
        for question in queued:
            self._deliver_to(question, EngineFailure(question.member, SHUTDOWN_MESSAGE))
        self._inbox.put(_FAIL_ALL)

    def shutdown(self) -> None:
        """Aborts everything in the engine and blocks until the thread has ended."""
        self._inbox.put(_STOP)
        self._thread.join()

    def finish_unscheduled(self, question: Question) -> None:
        """Ends a question that left the queue before it ran (on the event loop)."""
        usage = Usage(len(question.member.prompt_ids), 0, 0)
        self._deliver_to(question, TokenEvent(question.member, None, "", "abort", usage))

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            items = [self._inbox.get()] if not self._engine.has_work else []
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._inbox.get_nowait())
            for item in items:
                if item is _STOP:
                    self._post(list(self._engine.abort_all()))
                    return
                if item is _FAIL_ALL:
                    self._post([EngineFailure(m, SHUTDOWN_MESSAGE) for m in self._engine.reset()])
                    continue
                self._add(*item)
            self._step()

    def _add(self, members: list[Member], uses_trained_head: bool) -> None:
        self._num_taken += len(members)
        try:
            self._engine.add(members, uses_trained_head)
        except Exception as exc:  # noqa: BLE001 - the edge checked the group: this is a bug
            log.exception("the engine refused a group")
            self._post([EngineFailure(m, f"the engine refused this request: {exc!r}")
                        for m in members])

    def _step(self) -> None:
        try:
            events: list[QuestionEvent] = list(self._engine.step())
        except Exception as exc:  # noqa: BLE001 - a failed step fails what is in the engine
            log.exception("an engine step failed")
            message = f"the engine failed while generating: {type(exc).__name__}: {exc}"
            events = [EngineFailure(m, message) for m in self._engine.reset()]
        counters = self._engine.counters()
        self._metrics.observe_engine(counters)
        self._post(events, (self._num_taken, counters.num_waiting))

    def _post(self, items: list[QuestionEvent], load: tuple[int, int] | None = None) -> None:
        if not items and load is None:
            return
        # RuntimeError: the event loop is closed, nobody is left to read the events
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver_all, items, load)

    # --- back on the event loop --------------------------------------------------------------

    def _deliver_all(self, items: list[QuestionEvent], load: tuple[int, int] | None) -> None:
        if load is not None:
            self._reported = load
        for item in items:
            question = self._questions.get(item.member)
            if question is not None:  # else it has finished: e.g. a failure after its end
                self._deliver_to(question, item)

    def _deliver_to(self, question: Question, item: QuestionEvent) -> None:
        """Stamps the question, records metrics, queues the item; a final item finishes it."""
        if question.is_finished:
            return
        if isinstance(item, TokenEvent) and item.finish_reason == "error":
            item = EngineFailure(item.member, f"the engine failed on this request: {item.error}")
        now = time.monotonic()
        if isinstance(item, EngineFailure):
            question.finish(now, "error")
        else:
            if item.token_id is not None and question.first_token_at is None:
                question.first_token_at = now
                self._metrics.observe_first_token(question)
            if item.finish_reason is not None:
                question.finish(now, item.finish_reason, item.usage)
        if question.is_finished:
            self._questions.pop(question.member, None)
            self._metrics.observe_finished(question)
        question.events.put_nowait(item)
