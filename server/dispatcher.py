"""The async loop around the grouping (`server/grouping.py`): it takes questions in, holds the
queue to its limit, and hands each group to the engine worker as soon as the group is ready;
the worker's thread admits it between two steps of the running batch. Everything here runs on
the event loop; what it knows of the engine, the worker reported after a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Hashable, Sequence
from typing import Protocol

from server.grouping import GroupingPolicy, GroupQueue
from server.question import Question


class QueueFullError(Exception):
    """No room in the queue now: retry later (429)."""


class TooManyQuestionsError(ValueError):
    """More questions in one request than the queue can ever hold (400)."""


class Worker(Protocol):
    """The engine worker (server.worker.EngineWorker), as the dispatcher uses it."""

    @property
    def num_waiting(self) -> int:
        """Questions handed over that the engine has not admitted yet."""

    def submit(self, group: list[Question], uses_trained_head: bool) -> None:
        """Queues a group for the engine; never blocks."""

    def finish_unscheduled(self, question: Question) -> None:
        """Ends a question that left the queue before it was handed over."""

    def fail_all(self, queued: list[Question]) -> None:
        """Fails `queued` now and whatever is in the engine at its next step."""

    def shutdown(self) -> None:
        """Aborts everything in the engine; blocks until the worker has ended."""


class DispatcherMetrics(Protocol):
    def observe_group(self, group: list[Question], started_at: float) -> None: ...


class Dispatcher:
    def __init__(self, policy: GroupingPolicy, worker: Worker, metrics: DispatcherMetrics,
                 max_queue: int, trained_head_for_all: bool = False):
        self.queue: GroupQueue[Question] = GroupQueue(policy)
        self._trained_head_for_all = trained_head_for_all  # else only for chosen groups
        self._worker = worker
        self._metrics = metrics
        self._max_queue = max_queue
        self._in_engine: list[Question] = []  # handed to the engine, not known to be finished
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_in_flight(self) -> int:
        self._in_engine = [q for q in self._in_engine if not q.is_finished]
        return self.queue.num_waiting + len(self._in_engine)

    @property
    def num_waiting(self) -> int:
        """Questions not running yet: in an open group, or in the engine waiting for room."""
        return self.queue.num_waiting + self._worker.num_waiting

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="groupwise-dispatcher")

    def drain_soon(self) -> None:
        """Thread- and signal-safe: open groups stop waiting for members that cannot come."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drain)

    def fail_all_soon(self) -> None:
        """Thread- and signal-safe: everything queued or running ends now, with an error that
        tells its client to retry (a second signal while draining)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all)

    def _fail_all(self) -> None:
        self._worker.fail_all(self.queue.take_all())

    def _drain(self) -> None:
        self.queue.close_open_groups()
        self._wakeup.set()

    async def stop(self) -> None:
        """Aborts whatever is queued or running and waits for the worker thread to end."""
        for question in self.queue.take_all():
            self._worker.finish_unscheduled(question)
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self._worker.shutdown)

    def submit(self, question: Question, key: Hashable | None) -> None:
        """`key`: the question's group hint, scoped to its tenant; None: a group of one."""
        self._reserve(1)
        if key is None:
            self._hand_over([question], uses_trained_head=self._trained_head_for_all)
        else:
            self.queue.add(question, key, question.arrived_at)
            self._wakeup.set()

    def submit_groups(self, groups: Sequence[list[Question]]) -> None:
        """Pre-formed groups (one grouped request's), ready at once."""
        self._reserve(sum(len(group) for group in groups))
        for group in groups:
            self.queue.add_group(group, min(q.arrived_at for q in group))
        self._wakeup.set()

    def abort(self, question: Question) -> None:
        """The caller left: a waiting question leaves the queue, one in the engine is aborted."""
        if self.queue.remove(question):
            self._worker.finish_unscheduled(question)
        else:
            question.member.abort()

    def _reserve(self, count: int) -> None:
        if count > self._max_queue:
            raise TooManyQuestionsError(
                f"this request has {count} questions, more than the {self._max_queue} the "
                "server's queue can hold (--max-queue); send them in smaller requests")
        waiting = self.num_waiting
        if waiting + count > self._max_queue:
            raise QueueFullError(
                f"the queue is full ({waiting} questions waiting, limit {self._max_queue}); "
                "retry later")

    def _hand_over(self, group: list[Question], uses_trained_head: bool) -> None:
        now = time.monotonic()
        for question in group:
            question.hand_to_engine(now)
        self._metrics.observe_group(group, now)
        self._in_engine += group
        self._worker.submit(group, uses_trained_head)

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            for group in self.queue.take_ready(now):
                self._hand_over(group, uses_trained_head=True)
            self._wakeup.clear()
            deadline = self.queue.next_ready_at()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
