"""The grouping policy (server/grouping.py): pure, no asyncio, torch or HTTP."""

from __future__ import annotations

import pytest

from server import grouping
from server.grouping import GroupingPolicy, GroupQueue


def make_queue(**policy) -> GroupQueue:
    defaults = {"max_group_size": 3, "max_wait_s": 1.0}
    return GroupQueue(GroupingPolicy(**{**defaults, **policy}))


# --- the queue -------------------------------------------------------------------------------

def test_same_key_joins_one_group_until_it_is_full():
    queue = make_queue(max_group_size=2)
    for name in "abc":
        queue.add(name, "k", now=0.0)
    assert queue.num_waiting == 3
    # the full group [a, b] is ready at once; [c] waits for company
    assert queue.take_ready(now=0.0) == [["a", "b"]]
    assert queue.take_ready(now=0.5) == []
    assert queue.take_ready(now=1.0) == [["c"]]
    assert queue.num_waiting == 0


def test_group_without_key_is_ready_at_once_and_alone():
    queue = make_queue()
    queue.add("a", None, now=0.0)
    queue.add("b", None, now=0.0)
    assert queue.take_ready(now=0.0) == [["a"], ["b"]]


def test_open_group_waits_max_wait_from_its_first_member():
    queue = make_queue(max_wait_s=0.5)
    queue.add("a", "k", now=10.0)
    queue.add("b", "k", now=10.4)
    assert queue.next_ready_at() == pytest.approx(10.5)
    assert queue.take_ready(now=10.49) == []
    assert queue.take_ready(now=10.5) == [["a", "b"]]
    assert queue.next_ready_at() is None


def test_ready_groups_come_oldest_first():
    queue = make_queue(max_wait_s=0.0)
    for index, key in enumerate(["x", "y", "z"]):
        queue.add(key, key, now=float(index))
    assert queue.take_ready(now=5.0) == [["x"], ["y"], ["z"]]
    assert queue.take_ready(now=5.0) == []


def test_preformed_groups_are_ready_at_once_and_closed():
    queue = make_queue(max_group_size=2)
    queue.add_group(["a", "b"], now=0.0)
    queue.add_group(["c"], now=0.0)
    queue.add("x", "a", now=0.0)  # a keyed request never joins a pre-formed group
    assert queue.num_waiting == 4
    assert queue.take_ready(now=0.0) == [["a", "b"], ["c"]]


def test_removed_item_leaves_its_group():
    queue = make_queue()
    queue.add("a", "k", now=0.0)
    queue.add("b", "k", now=0.0)
    assert queue.remove("a") is True
    assert queue.remove("a") is False
    assert queue.num_waiting == 1
    assert queue.take_ready(now=2.0) == [["b"]]


def test_removing_the_last_member_drops_the_group_and_reopens_the_key():
    queue = make_queue()
    queue.add("a", "k", now=0.0)
    queue.remove("a")
    assert queue.next_ready_at() is None
    queue.add("b", "k", now=5.0)
    assert queue.take_ready(now=5.5) == []
    assert queue.take_ready(now=6.0) == [["b"]]


def test_take_all_empties_the_queue():
    queue = make_queue()
    queue.add("a", "k", now=0.0)
    queue.add_group(["b", "c"], now=0.0)
    assert sorted(queue.take_all()) == ["a", "b", "c"]
    assert queue.num_waiting == 0 and queue.take_ready(now=9.0) == []


def test_closing_open_groups_makes_them_ready_and_stops_joining():
    queue = make_queue(max_wait_s=60.0)
    queue.add("a", "k", now=0.0)
    queue.close_open_groups()
    queue.add("b", "k", now=0.0)  # a new group: the closed one takes no one
    assert queue.take_ready(now=0.0) == [["a"]]
    assert queue.take_ready(now=1.0) == []


def test_a_key_asking_one_question_at_a_time_stops_waiting_until_company_comes():
    queue = make_queue(max_wait_s=0.5)
    queue.add("a", "k", now=0.0)
    assert queue.take_ready(now=0.5) == [["a"]]  # waited its time for no one
    queue.add("b", "k", now=2.0)  # the next question, after a's answer: ready at once
    assert queue.take_ready(now=2.0) == [["b"]]
    queue.add("c", "k", now=3.0)
    queue.add("d", "k", now=3.1)  # c went at once; d opens a group that waits again
    assert queue.take_ready(now=3.1) == [["c"]]
    queue.add("e", "k", now=3.2)
    assert queue.take_ready(now=3.5) == []
    assert queue.take_ready(now=3.6) == [["d", "e"]]  # company came: the key waits again
    queue.add("f", "k", now=5.0)
    assert queue.take_ready(now=5.0) == []
    assert queue.take_ready(now=5.5) == [["f"]]
    queue.add("g", "other", now=6.0)  # other keys never stopped waiting
    assert queue.take_ready(now=6.0) == [] and queue.take_ready(now=6.5) == [["g"]]


def test_only_the_most_recent_lone_keys_are_remembered(monkeypatch):
    monkeypatch.setattr(grouping, "MAX_LONE_KEYS", 2)
    queue = make_queue(max_wait_s=0.5)
    for index, key in enumerate("xyz"):
        queue.add(key, key, now=float(index))
        assert queue.take_ready(now=index + 0.5) == [[key]]
    queue.add("x2", "x", now=9.0)  # x, the oldest, was forgotten: it waits again
    queue.add("z2", "z", now=9.0)
    assert queue.take_ready(now=9.0) == [["z2"]]
    assert queue.take_ready(now=9.5) == [["x2"]]
