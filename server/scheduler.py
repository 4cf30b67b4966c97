"""Which queued questions run together, and when.

The policy is pure Python (no asyncio, torch or HTTP), so it is tested on its own:
  - `GroupingPolicy.group_key`: requests with the same key may share a group. The key is the
    caller's group hint, else the first `min_prefix_tokens` prompt tokens (the same system
    prompt + passage); a shorter prompt without a hint has no key and is a group of its own.
  - `GroupQueue`: open groups, one per key, fill up to `max_group_size`. A group is ready when
    it is full, closed (a pre-formed group, or a request that cannot gain peers), or its first
    member has waited `max_wait_s`. A batch is up to `max_batch_groups` ready groups, oldest
    first.
`Scheduler` is the thin async loop around it: it takes ready batches and awaits the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


class QueueFullError(Exception):
    pass


@dataclass(frozen=True)
class GroupingPolicy:
    max_group_size: int = 8
    max_wait_s: float = 0.02
    max_batch_groups: int = 8
    min_prefix_tokens: int = 64  # 0: never group by prefix

    def group_key(self, hint: str | None, prompt_ids: Sequence[int]) -> Hashable | None:
        if hint:
            return ("hint", hint)
        if self.min_prefix_tokens and len(prompt_ids) >= self.min_prefix_tokens:
            return ("prefix", tuple(prompt_ids[: self.min_prefix_tokens]))
        return None


@dataclass(eq=False)
class PendingGroup:
    key: Hashable | None  # None: closed, no one else can join
    opened_at: float
    items: list = field(default_factory=list)

    def is_ready(self, now: float, policy: GroupingPolicy) -> bool:
        return (
            self.key is None
            or len(self.items) >= policy.max_group_size
            or now - self.opened_at >= policy.max_wait_s
        )


class GroupQueue:
    """Questions waiting to run, in groups. Items are opaque; they are compared by identity."""

    def __init__(self, policy: GroupingPolicy):
        self.policy = policy
        self._groups: list[PendingGroup] = []  # oldest first
        self._open: dict[Hashable, PendingGroup] = {}  # key -> the group still taking members
        self.num_waiting = 0

    def add(self, item, key: Hashable | None, now: float) -> None:
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

    def add_group(self, items: Sequence, now: float) -> None:
        """A pre-formed group, ready at once; split into groups of at most max_group_size."""
        size = self.policy.max_group_size
        for start in range(0, len(items), size):
            self._groups.append(PendingGroup(None, now, list(items[start : start + size])))
        self.num_waiting += len(items)

    def remove(self, item) -> bool:
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

    def take_batch(self, now: float) -> list[list]:
        """Up to max_batch_groups ready groups, oldest first, removed from the queue."""
        ready = [g for g in self._groups if g.is_ready(now, self.policy)]
        batch = ready[: self.policy.max_batch_groups]
        for group in batch:
            self._close(group)
            self._groups.remove(group)
            self.num_waiting -= len(group.items)
        return [group.items for group in batch]

    def take_all(self) -> list:
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

    def _close(self, group: PendingGroup) -> None:
        if group.key is not None and self._open.get(group.key) is group:
            del self._open[group.key]


class Scheduler:
    """The async loop: waits for ready groups, runs them as one batch on the worker, repeats.
    Requests must have `member`, `arrived_at` and `scheduled_at` (server.worker.ServerRequest)."""

    def __init__(self, policy: GroupingPolicy, worker, metrics, max_queue: int):
        self.queue = GroupQueue(policy)
        self._worker = worker
        self._metrics = metrics
        self._max_queue = max_queue
        self._running: list = []  # requests of the batch on the worker now
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_in_flight(self) -> int:
        return self.queue.num_waiting + len(self._running)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="groupwise-scheduler")

    def drain_soon(self) -> None:
        """Thread- and signal-safe: open groups stop waiting for members that cannot come."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.queue.close_open_groups()
        self._wakeup.set()

    async def stop(self) -> None:
        """Aborts whatever is queued or running and waits for the worker thread to end."""
        for request in self.queue.take_all():
            self._worker.finish_unscheduled(request)
        for request in self._running:
            request.member.abort()
        if self._task is not None:
            self._task.cancel()
        await asyncio.to_thread(self._worker.shutdown)
        self._update_gauges()

    def submit(self, request, hint: str | None) -> None:
        self._reserve(1)
        key = self.queue.policy.group_key(hint, request.member.prompt_ids)
        self.queue.add(request, key, request.arrived_at)
        self._wake()

    def submit_group(self, requests: Sequence) -> None:
        self._reserve(len(requests))
        self.queue.add_group(requests, min(r.arrived_at for r in requests))
        self._wake()

    def abort(self, request) -> None:
        """The caller left: a waiting request leaves the queue, a running one is aborted."""
        if self.queue.remove(request):
            self._worker.finish_unscheduled(request)
            self._update_gauges()
        else:
            request.member.abort()

    def _reserve(self, count: int) -> None:
        if self.queue.num_waiting + count > self._max_queue:
            raise QueueFullError(
                f"the queue is full ({self.queue.num_waiting} questions waiting, limit "
                f"{self._max_queue}); retry later"
            )

    def _wake(self) -> None:
        self._update_gauges()
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            groups = self.queue.take_batch(now)
            if groups:
                await self._run_batch(groups, now)
                continue
            self._wakeup.clear()
            deadline = self.queue.next_ready_at()
            timeout = None if deadline is None else max(0.0, deadline - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _run_batch(self, groups: list[list], now: float) -> None:
        for group in groups:
            for request in group:
                request.scheduled_at = now
            self._metrics.observe_group(group, now)
        self._running = [request for group in groups for request in group]
        self._update_gauges()
        try:
            await self._worker.run(groups)
        finally:
            self._running = []
            self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.set_queue_sizes(self.queue.num_waiting, len(self._running))
