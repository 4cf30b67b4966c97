"""The dispatcher (server/dispatcher.py): the thin async loop that hands ready groups to the
engine worker, here a fake one that records what it is handed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from model.engine.interface import Member
from server.dispatcher import Dispatcher, QueueFullError
from server.grouping import GroupingPolicy
from server.question import Question, QuestionStatus


@dataclass
class FakeWorker:
    """server.dispatcher.Worker without an engine: it records what it is handed."""

    num_waiting: int = 0  # handed over, not admitted: as the engine last reported
    groups: list = field(default_factory=list)  # (group, uses_trained_head) handed over
    unscheduled: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    def submit(self, group: list[Question], uses_trained_head: bool) -> None:
        self.groups.append((group, uses_trained_head))
        self.num_waiting += len(group)

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
    """server.dispatcher.DispatcherMetrics: the sizes of the groups handed over."""

    def __init__(self):
        self.groups = []

    def observe_group(self, group: list[Question], started_at: float) -> None:
        self.groups.append(len(group))


def make_dispatcher(worker, max_queue=10, trained_head_for_all=False,
                    **policy) -> tuple[Dispatcher, FakeMetrics]:
    defaults = {"max_group_size": 4, "max_wait_s": 0.05}
    metrics = FakeMetrics()
    dispatcher = Dispatcher(GroupingPolicy(**{**defaults, **policy}), worker, metrics,
                            max_queue=max_queue, trained_head_for_all=trained_head_for_all)
    return dispatcher, metrics


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
        dispatcher, metrics = make_dispatcher(worker, max_wait_s=60.0)
        dispatcher.start()
        alone = question(4)
        dispatcher.submit(alone, key=None)
        assert worker.groups == [([alone], False)]  # no wait, and not the trained head
        grouped = [question(1), question(2), question(3), question(5)]
        for item in grouped:
            dispatcher.submit(item, key="g")
        await wait_until(lambda: len(worker.groups) == 2)  # full at max_group_size
        assert worker.groups[1] == (grouped, True)
        assert sorted(metrics.groups) == [1, 4]
        assert all(item.scheduled_at is not None for item in [*grouped, alone])
        assert all(item.status is QuestionStatus.IN_ENGINE for item in [*grouped, alone])
        await dispatcher.stop()

    asyncio.run(scenario())


def test_trained_head_for_all_serves_lone_requests_too():
    async def scenario():
        worker = FakeWorker()
        dispatcher, _ = make_dispatcher(worker, trained_head_for_all=True)
        dispatcher.start()
        dispatcher.submit(question(1), key=None)
        assert worker.groups[0][1] is True
        await dispatcher.stop()

    asyncio.run(scenario())


def test_full_queue_refuses_and_aborts_free_room():
    async def scenario():
        worker = FakeWorker()
        dispatcher, _ = make_dispatcher(worker, max_queue=2, max_wait_s=60.0)
        dispatcher.start()
        first, second = question(1), question(2)
        dispatcher.submit(first, key="g")
        dispatcher.submit(second, key="g")
        with pytest.raises(QueueFullError, match="2 questions waiting"):
            dispatcher.submit(question(3), key="g")
        with pytest.raises(QueueFullError):
            dispatcher.submit_groups([[question(4)]])
        dispatcher.abort(first)  # still waiting: it leaves the queue, no engine abort needed
        assert worker.unscheduled == [first] and not first.member.is_aborted
        assert second.status is QuestionStatus.QUEUED
        dispatcher.submit(question(5), key="g")
        assert dispatcher.num_in_flight == 2
        await dispatcher.stop()
        assert len(worker.unscheduled) == 3  # stop() ends what still waits

    asyncio.run(scenario())


def test_requests_waiting_in_the_engine_count_against_the_queue():
    async def scenario():
        worker = FakeWorker()
        dispatcher, _ = make_dispatcher(worker, max_queue=2)
        dispatcher.start()
        admitted, waiting = question(1), question(2)
        dispatcher.submit(admitted, key=None)
        dispatcher.submit(waiting, key=None)
        worker.num_waiting = 1  # the engine reported room for one of them
        assert dispatcher.num_waiting == 1 and dispatcher.num_in_flight == 2
        dispatcher.submit(question(3), key=None)
        with pytest.raises(QueueFullError):
            dispatcher.submit(question(4), key=None)
        await dispatcher.stop()

    asyncio.run(scenario())


def test_abort_of_a_request_in_the_engine_reaches_its_member():
    async def scenario():
        worker = FakeWorker()
        dispatcher, _ = make_dispatcher(worker)
        dispatcher.start()
        running = question(1)
        dispatcher.submit(running, key=None)
        assert dispatcher.num_in_flight == 1
        dispatcher.abort(running)
        assert running.member.is_aborted and worker.unscheduled == []
        assert running.status is QuestionStatus.IN_ENGINE  # until the engine reports its end
        running.finish(time.monotonic(), "abort")  # the worker delivered its final event
        assert dispatcher.num_in_flight == 0
        await dispatcher.stop()

    asyncio.run(scenario())


def test_drain_runs_waiting_groups_at_once():
    async def scenario():
        worker = FakeWorker()
        dispatcher, _ = make_dispatcher(worker, max_wait_s=60.0)
        dispatcher.start()
        waiting = question(1)
        dispatcher.submit(waiting, key="g")
        await asyncio.sleep(0.02)
        assert worker.groups == []
        dispatcher.drain_soon()
        await wait_until(lambda: worker.handed == [[waiting]])
        await dispatcher.stop()

    asyncio.run(scenario())


def test_fail_all_hands_the_queued_questions_to_the_worker():
    async def scenario():
        worker = FakeWorker()
        dispatcher, _ = make_dispatcher(worker, max_wait_s=60.0)
        dispatcher.start()
        waiting, running = question(1), question(2)
        dispatcher.submit(waiting, key="g")
        dispatcher.submit(running, key=None)
        dispatcher.fail_all_soon()
        await wait_until(lambda: worker.failed == [waiting])
        assert dispatcher.num_in_flight == 1  # the worker fails the running one at its next step
        await dispatcher.stop()

    asyncio.run(scenario())
