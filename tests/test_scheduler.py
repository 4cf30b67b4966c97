"""The grouping policy (pure: no asyncio, torch or HTTP) and the thin async loop around it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from model.engine.request import Member, Status
from server.question import Question, QuestionStatus
from server.scheduler import GroupingPolicy, GroupQueue, QueueFullError, Scheduler


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


def test_preformed_group_is_split_at_max_group_size_and_ready():
    queue = make_queue(max_group_size=2)
    queue.add_group(["a", "b", "c", "d", "e"], now=0.0)
    queue.add("x", "a", now=0.0)  # a keyed request never joins a pre-formed group
    assert queue.num_waiting == 6
    assert queue.take_ready(now=0.0) == [["a", "b"], ["c", "d"], ["e"]]


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


# --- the async loop, with a fake worker --------------------------------------------------------

@dataclass
class FakeWorker:
    """server.scheduler.Worker without an engine: it records what it is handed."""

    groups: list = field(default_factory=list)  # (group, uses_trained_head) handed over
    unscheduled: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    def submit(self, group: list[Question], uses_trained_head: bool) -> None:
        self.groups.append((group, uses_trained_head))

    def finish_unscheduled(self, question: Question) -> None:
        self.unscheduled.append(question)
        question.finish(time.monotonic(), "abort")

    def fail_all(self, queued: list[Question]) -> None:
        self.failed += queued
        for question in queued:
            question.finish(time.monotonic(), "error")

    def shutdown(self) -> None:
        pass

    @property
    def handed(self) -> list:
        return [group for group, _ in self.groups]


class FakeMetrics:
    """server.scheduler.SchedulerMetrics: the sizes of the groups handed over."""

    def __init__(self):
        self.groups = []

    def observe_group(self, group: list[Question], started_at: float) -> None:
        self.groups.append(len(group))


def make_scheduler(worker, max_queue=10, trained_head_for_all=False,
                   **policy) -> tuple[Scheduler, FakeMetrics]:
    defaults = {"max_group_size": 4, "max_wait_s": 0.05}
    metrics = FakeMetrics()
    policy = GroupingPolicy(**{**defaults, **policy})
    scheduler = Scheduler(policy, worker, metrics, max_queue=max_queue,
                          trained_head_for_all=trained_head_for_all)
    return scheduler, metrics


def question(*ids) -> Question:
    return Question(Member(list(ids)), asyncio.Queue())


async def wait_until(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_hinted_requests_form_one_group_and_others_go_at_once_alone():
    async def scenario():
        worker = FakeWorker()
        scheduler, metrics = make_scheduler(worker, max_wait_s=60.0)
        scheduler.start()
        alone = question(4)
        scheduler.submit(alone, key=None)
        assert worker.groups == [([alone], False)]  # no wait, and not the trained head
        grouped = [question(1), question(2), question(3), question(5)]
        for item in grouped:
            scheduler.submit(item, key="g")
        await wait_until(lambda: len(worker.groups) == 2)  # full at max_group_size
        assert worker.groups[1] == (grouped, True)
        assert sorted(metrics.groups) == [1, 4]
        assert all(item.scheduled_at is not None for item in [*grouped, alone])
        assert all(item.status is QuestionStatus.IN_ENGINE for item in [*grouped, alone])
        await scheduler.stop()

    asyncio.run(scenario())


def test_trained_head_for_all_serves_lone_requests_too():
    async def scenario():
        worker = FakeWorker()
        scheduler, _ = make_scheduler(worker, trained_head_for_all=True)
        scheduler.start()
        scheduler.submit(question(1), key=None)
        assert worker.groups[0][1] is True
        await scheduler.stop()

    asyncio.run(scenario())


def test_full_queue_refuses_and_aborts_free_room():
    async def scenario():
        worker = FakeWorker()
        scheduler, _ = make_scheduler(worker, max_queue=2, max_wait_s=60.0)
        scheduler.start()
        first, second = question(1), question(2)
        scheduler.submit(first, key="g")
        scheduler.submit(second, key="g")
        with pytest.raises(QueueFullError, match="2 questions waiting"):
            scheduler.submit(question(3), key="g")
        with pytest.raises(QueueFullError):
            scheduler.submit_group([question(4)])
        scheduler.abort(first)  # still waiting: it leaves the queue, no engine abort needed
        assert worker.unscheduled == [first] and not first.member.is_aborted
        assert second.status is QuestionStatus.QUEUED
        scheduler.submit(question(5), key="g")
        assert scheduler.num_in_flight == 2
        await scheduler.stop()
        assert len(worker.unscheduled) == 3  # stop() ends what still waits

    asyncio.run(scenario())


def test_requests_waiting_in_the_engine_count_against_the_queue():
    async def scenario():
        worker = FakeWorker()
        scheduler, _ = make_scheduler(worker, max_queue=2)
        scheduler.start()
        admitted, waiting = question(1), question(2)
        scheduler.submit(admitted, key=None)
        scheduler.submit(waiting, key=None)
        admitted.member.status = Status.DECODE  # the engine found room for one of them
        assert scheduler.num_waiting == 1 and scheduler.num_in_flight == 2
        scheduler.submit(question(3), key=None)
        with pytest.raises(QueueFullError):
            scheduler.submit(question(4), key=None)
        await scheduler.stop()

    asyncio.run(scenario())


def test_abort_of_a_request_in_the_engine_reaches_its_member():
    async def scenario():
        worker = FakeWorker()
        scheduler, _ = make_scheduler(worker)
        scheduler.start()
        running = question(1)
        scheduler.submit(running, key=None)
        assert scheduler.num_in_flight == 1
        scheduler.abort(running)
        assert running.member.is_aborted and worker.unscheduled == []
        assert running.status is QuestionStatus.IN_ENGINE  # until the engine reports its end
        running.finish(time.monotonic(), "abort")  # the worker delivered its final event
        assert scheduler.num_in_flight == 0
        await scheduler.stop()

    asyncio.run(scenario())


def test_closing_open_groups_makes_them_ready_and_stops_joining():
    queue = make_queue(max_wait_s=60.0)
    queue.add("a", "k", now=0.0)
    queue.close_open_groups()
    queue.add("b", "k", now=0.0)  # a new group: the closed one takes no one
    assert queue.take_ready(now=0.0) == [["a"]]
    assert queue.take_ready(now=1.0) == []


def test_drain_runs_waiting_groups_at_once():
    async def scenario():
        worker = FakeWorker()
        scheduler, _ = make_scheduler(worker, max_wait_s=60.0)
        scheduler.start()
        waiting = question(1)
        scheduler.submit(waiting, key="g")
        await asyncio.sleep(0.02)
        assert worker.groups == []
        scheduler.drain_soon()
        await wait_until(lambda: worker.handed == [[waiting]])
        await scheduler.stop()

    asyncio.run(scenario())


def test_fail_all_hands_the_queued_questions_to_the_worker():
    async def scenario():
        worker = FakeWorker()
        scheduler, _ = make_scheduler(worker, max_wait_s=60.0)
        scheduler.start()
        waiting, running = question(1), question(2)
        scheduler.submit(waiting, key="g")
        scheduler.submit(running, key=None)
        scheduler.fail_all_soon()
        await wait_until(lambda: worker.failed == [waiting])
        assert scheduler.num_in_flight == 1  # the worker fails the running one at its next step
        await scheduler.stop()

    asyncio.run(scenario())
