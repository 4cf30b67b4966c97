"""Which questions form a group, and when a group is ready. Pure Python (no asyncio, torch or
HTTP), so it is tested on its own:
  - `GroupQueue`: questions that carry a group hint wait in the open group of their key
    (tenant, cache salt, hint) until it holds `max_group_size` members or its first member has
    waited `max_wait_s`. A key whose last group waited that long for no one (its questions
    come one at a time, each after the last one's answer) stops waiting: a question of it that
    comes `max_wait_s` or more after the last one is ready at once; one that comes sooner
    opens a group that waits, and once a group of the key gets a second member, the key waits
    again. A grouped request arrives as pre-formed groups, ready at once.
  - A question without a hint is a group of one, sent to the engine at once. It shares compute
    with every other question of its tenant through the engine's prefix cache (the longest
    cached prefix, token by token), but never rows: its answer never depends on strangers.
`server/dispatcher.py` is the thin async loop around it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


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


# keys remembered as asking one question at a time (the least recently seen are forgotten)
MAX_LONE_KEYS = 4096


class GroupQueue(Generic[Item]):
    """Questions waiting for their group to fill. Items are opaque, compared by identity."""

    def __init__(self, policy: GroupingPolicy):
        self.policy = policy
        self._groups: list[PendingGroup[Item]] = []  # oldest first
        self._open: dict[Hashable, PendingGroup[Item]] = {}  # key -> the group still taking members
        self._lone: OrderedDict[Hashable, float] = OrderedDict()  # key -> its last lone question
        self.num_waiting = 0

    def add(self, item: Item, key: Hashable | None, now: float) -> None:
        """Adds `item` to the open group of `key` (or opens one); key None: a group of one.
        A key that asks one question at a time opens no group for a question that comes at
        least `max_wait_s` after its last one: that question is ready at once."""
        group = self._open.get(key) if key is not None else None
        if group is None:
            lone_at = self._lone.get(key) if key is not None else None
            at_once = lone_at is not None and now - lone_at >= self.policy.max_wait_s
            if at_once:
                self._remember(key, lone_at=now)
            group = PendingGroup(None if at_once else key, now)
            self._groups.append(group)
            if group.key is not None:
                self._open[key] = group
        group.items.append(item)
        self.num_waiting += 1
        if len(group.items) >= self.policy.max_group_size:
            self._close(group)

    def add_group(self, items: Sequence[Item], now: float) -> None:
        """A pre-formed group (of at most max_group_size), ready at once."""
        assert 0 < len(items) <= self.policy.max_group_size
        self._groups.append(PendingGroup(None, now, list(items)))
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
            if group.key is not None:
                self._remember(group.key, lone_at=now if len(group.items) == 1 else None)
        return [group.items for group in ready]

    def _remember(self, key: Hashable, lone_at: float | None) -> None:
        """When `key`'s last question went on alone (its group waited its time for no one,
        or it was ready at once); None: its last group had company."""
        self._lone.pop(key, None)
        if lone_at is not None:
            self._lone[key] = lone_at
            if len(self._lone) > MAX_LONE_KEYS:
                self._lone.popitem(last=False)

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
