"""Which questions form a group, and when a group goes to the engine.

The policy is pure Python (no asyncio, torch or HTTP), so it is tested on its own:
  - `GroupQueue`: questions that carry a group hint wait in the open group of their key
    (tenant, cache salt, hint) until it holds `max_group_size` members or its first member has
    waited `max_wait_s`. A grouped request arrives as a pre-formed group and is ready at once.
  - A question without a hint is a group of one, sent to the engine at once. It shares compute
    with every other question of its tenant through the engine's prefix cache (the longest
    cached prefix, token by token), but never rows: its answer never depends on strangers.
`Scheduler` is the thin async loop around it: it hands ready groups to the engine worker, which
admits them between two steps of the running batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from model.engine.request import Status
from server.question import Question

Item = TypeVar("Item")


class QueueFullError(Exception):
    """No room in the queue now: retry later (429)."""


class TooManyQuestionsError(ValueError):
    """More questions in one request than the queue can ever hold (400)."""


@dataclass(frozen=True)
class GroupingPolicy:
    max_group_size: int = 8
    max_wait_s: float = 0.02


@dataclass(eq=False)
class PendingGroup(Generic[Item]):
    key: Hashable | None  # None: closed, no one else can join
    opened_at: float
    items: list[Item] = field(default_factory=list)

    def is_ready(self, now: float, policy: GroupingPolicy) -> bool:
        return (
            self.key is None
            or len(self.items) >= policy.max_group_size
            or now - self.opened_at >= policy.max_wait_s
        )


class GroupQueue(Generic[Item]):
    """Questions waiting for their group to fill. Items are opaque, compared by identity."""

    def __init__(self, policy: GroupingPolicy):
        self.policy = policy
        self._groups: list[PendingGroup[Item]] = []  # oldest first
        self._open: dict[Hashable, PendingGroup[Item]] = {}  # key -> the group still taking members
        self.num_waiting = 0

    def add(self, item: Item, key: Hashable | None, now: float) -> None:
        """Adds `item` to the open group of `key` (or opens one); key None: a group of one."""
        group = self._open.get(key) if key is not None else None
        if group is None:
            group = PendingGroup(key, now)
            self._groups.append(group)
            if key is not None:
                self._open[key] = group
        group.items.append(item)
        self.num_waiting += 1
        if len(group.items) >= self.policy.max_group_size:
            self._close(group)

    def add_group(self, items: Sequence[Item], now: float) -> None:
        """A pre-formed group, ready at once; split into groups of at most max_group_size."""
        size = self.policy.max_group_size
        for start in range(0, len(items), size):
            self._groups.append(PendingGroup(None, now, list(items[start : start + size])))
        self.num_waiting += len(items)

    def remove(self, item: Item) -> bool:
        """Takes a waiting item out (its caller left); False if it is not waiting."""
        for group in self._groups:
            if any(member is item for member in group.items):
                group.items = [member for member in group.items if member is not item]
                self.num_waiting -= 1
                if not group.items:
                    self._close(group)
                    self._groups.remove(group)
                return True
        return False

    def take_ready(self, now: float) -> list[list[Item]]:
        """Every ready group, oldest first, removed from the queue."""
        ready = [g for g in self._groups if g.is_ready(now, self.policy)]
        for group in ready:
            self._close(group)
            self._groups.remove(group)
            self.num_waiting -= len(group.items)
        return [group.items for group in ready]

    def take_all(self) -> list[Item]:
        """Empties the queue; returns every waiting item."""
        items = [item for group in self._groups for item in group.items]
        self._groups, self._open, self.num_waiting = [], {}, 0
        return items

    def close_open_groups(self) -> None:
        """No one can join any more (the server drains): every waiting group is ready now."""
        for group in self._groups:
            group.key = None
        self._open.clear()

    def next_ready_at(self) -> float | None:
        """When the oldest open group's wait ends (None if nothing waits)."""
        if not self._groups:
            return None
        return min(g.opened_at + self.policy.max_wait_s for g in self._groups)

    def _close(self, group: PendingGroup[Item]) -> None:
        if group.key is not None and self._open.get(group.key) is group:
            del self._open[group.key]


class Worker(Protocol):
    """The engine worker (server.worker.EngineWorker), as the scheduler uses it."""

    def submit(self, group: list[Question], uses_trained_head: bool) -> None:
        """Queues a group for the engine; never blocks."""

    def finish_unscheduled(self, question: Question) -> None:
        """Ends a question that left the queue before it was handed over."""

    def fail_all(self, queued: list[Question]) -> None:
        """Fails `queued` now and whatever is in the engine at its next step."""

    def shutdown(self) -> None:
        """Aborts everything in the engine; blocks until the worker has ended."""


class SchedulerMetrics(Protocol):
    def observe_group(self, group: list[Question], started_at: float) -> None: ...


class Scheduler:
    """The async loop: hands ready groups to the engine worker as soon as they are ready."""

    def __init__(self, policy: GroupingPolicy, worker: Worker, metrics: SchedulerMetrics,
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
        self._in_engine = [q for q in self._in_engine if not q.is_finished]
        admitted = sum(q.member.status is not Status.WAITING for q in self._in_engine)
        return self.queue.num_waiting + len(self._in_engine) - admitted

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="groupwise-scheduler")

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

    def submit_group(self, questions: Sequence[Question]) -> None:
        self._reserve(len(questions))
        self.queue.add_group(questions, min(q.arrived_at for q in questions))
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
