"""The grouping policy (pure: no asyncio, torch or HTTP) and the thin async loop around it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from server.scheduler import GroupingPolicy, GroupQueue, QueueFullError, Scheduler


def make_queue(**policy) -> GroupQueue:
    defaults = {"max_group_size": 3, "max_wait_s": 1.0, "max_batch_groups": 2,
                "min_prefix_tokens": 4}
    return GroupQueue(GroupingPolicy(**{**defaults, **policy}))


# --- grouping keys ---------------------------------------------------------------------------

def test_hint_wins_over_prefix():
    policy = GroupingPolicy(min_prefix_tokens=2)
    assert policy.group_key("g", [1, 2, 3]) == policy.group_key("g", [9, 9, 9])
    assert policy.group_key("g", [1, 2, 3]) != policy.group_key(None, [1, 2, 3])
    assert policy.group_key("g", [1]) != policy.group_key("h", [1])


def test_prompts_sharing_the_prefix_share_a_key():
    policy = GroupingPolicy(min_prefix_tokens=3)
    assert policy.group_key(None, [1, 2, 3, 4]) == policy.group_key(None, [1, 2, 3, 7, 8])
    assert policy.group_key(None, [1, 2, 3, 4]) != policy.group_key(None, [1, 2, 5, 4])


def test_short_prompt_without_hint_has_no_key():
    assert GroupingPolicy(min_prefix_tokens=3).group_key(None, [1, 2]) is None
    assert GroupingPolicy(min_prefix_tokens=0).group_key(None, list(range(100))) is None


# --- the queue -------------------------------------------------------------------------------

def test_same_key_joins_one_group_until_it_is_full():
    queue = make_queue(max_group_size=2, max_batch_groups=5)
    for name in "abc":
        queue.add(name, "k", now=0.0)
    assert queue.num_waiting == 3
    # the full group [a, b] is ready at once; [c] waits for company
    assert queue.take_batch(now=0.0) == [["a", "b"]]
    assert queue.take_batch(now=0.5) == []
    assert queue.take_batch(now=1.0) == [["c"]]
    assert queue.num_waiting == 0


def test_group_without_key_is_ready_at_once_and_alone():
    queue = make_queue()
    queue.add("a", None, now=0.0)
    queue.add("b", None, now=0.0)
    assert queue.take_batch(now=0.0) == [["a"], ["b"]]


def test_open_group_waits_max_wait_from_its_first_member():
    queue = make_queue(max_wait_s=0.5)
    queue.add("a", "k", now=10.0)
    queue.add("b", "k", now=10.4)
    assert queue.next_ready_at() == pytest.approx(10.5)
    assert queue.take_batch(now=10.49) == []
    assert queue.take_batch(now=10.5) == [["a", "b"]]
    assert queue.next_ready_at() is None


def test_batch_takes_oldest_ready_groups_up_to_the_cap():
    queue = make_queue(max_batch_groups=2, max_wait_s=0.0)
    for index, key in enumerate(["x", "y", "z"]):
        queue.add(key, key, now=float(index))
    assert queue.take_batch(now=5.0) == [["x"], ["y"]]
    assert queue.take_batch(now=5.0) == [["z"]]


def test_preformed_group_is_split_at_max_group_size_and_ready():
    queue = make_queue(max_group_size=2, max_batch_groups=5)
    queue.add_group(["a", "b", "c", "d", "e"], now=0.0)
    queue.add("x", "a", now=0.0)  # a keyed request never joins a pre-formed group
    assert queue.num_waiting == 6
    assert queue.take_batch(now=0.0) == [["a", "b"], ["c", "d"], ["e"]]


def test_removed_item_leaves_its_group():
    queue = make_queue()
    queue.add("a", "k", now=0.0)
    queue.add("b", "k", now=0.0)
    assert queue.remove("a") is True
    assert queue.remove("a") is False
    assert queue.num_waiting == 1
    assert queue.take_batch(now=2.0) == [["b"]]


def test_removing_the_last_member_drops_the_group_and_reopens_the_key():
    queue = make_queue()
    queue.add("a", "k", now=0.0)
    queue.remove("a")
    assert queue.next_ready_at() is None
    queue.add("b", "k", now=5.0)
    assert queue.take_batch(now=5.5) == []
    assert queue.take_batch(now=6.0) == [["b"]]


def test_take_all_empties_the_queue():
    queue = make_queue()
    queue.add("a", "k", now=0.0)
    queue.add_group(["b", "c"], now=0.0)
    assert sorted(queue.take_all()) == ["a", "b", "c"]
    assert queue.num_waiting == 0 and queue.take_batch(now=9.0) == []


# --- the async loop, with a fake worker --------------------------------------------------------

@dataclass(eq=False)
class FakeMember:
    prompt_ids: list
    aborted: bool = False

    def abort(self):
        self.aborted = True


@dataclass(eq=False)
class FakeRequest:
    member: FakeMember
    arrived_at: float = 0.0
    scheduled_at: float | None = None


@dataclass
class FakeWorker:
    batches: list = field(default_factory=list)
    unscheduled: list = field(default_factory=list)
    release: asyncio.Event | None = None  # when set, a batch waits for it

    async def run(self, groups):
        self.batches.append(groups)
        if self.release is not None:
            await self.release.wait()

    def finish_unscheduled(self, request):
        self.unscheduled.append(request)

    def shutdown(self):
        pass


class FakeMetrics:
    def __init__(self):
        self.groups, self.sizes = [], []

    def observe_group(self, group, started_at):
        self.groups.append(len(group))

    def set_queue_sizes(self, waiting, running):
        self.sizes.append((waiting, running))


def make_scheduler(worker, max_queue=10, **policy) -> tuple[Scheduler, FakeMetrics]:
    defaults = {"max_group_size": 4, "max_wait_s": 0.05, "max_batch_groups": 4,
                "min_prefix_tokens": 0}
    metrics = FakeMetrics()
    policy = GroupingPolicy(**{**defaults, **policy})
    return Scheduler(policy, worker, metrics, max_queue=max_queue), metrics


def request(*ids) -> FakeRequest:
    return FakeRequest(FakeMember(list(ids)), arrived_at=time.monotonic())


async def wait_until(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_loop_runs_hinted_requests_as_one_group_and_others_alone():
    async def scenario():
        worker = FakeWorker()
        scheduler, metrics = make_scheduler(worker)
        scheduler.start()
        grouped = [request(1), request(2), request(3)]
        for item in grouped:
            scheduler.submit(item, hint="g")
        alone = request(4)
        scheduler.submit(alone, hint=None)
        await wait_until(lambda: sum(len(g) for b in worker.batches for g in b) == 4)
        await scheduler.stop()
        groups = [g for batch in worker.batches for g in batch]
        assert [alone] in groups and grouped in groups
        assert sorted(metrics.groups) == [1, 3]
        assert all(item.scheduled_at is not None for item in [*grouped, alone])

    asyncio.run(scenario())


def test_full_queue_refuses_and_aborts_free_room():
    async def scenario():
        worker = FakeWorker()
        scheduler, _ = make_scheduler(worker, max_queue=2, max_wait_s=60.0)
        scheduler.start()
        first, second = request(1), request(2)
        scheduler.submit(first, hint="g")
        scheduler.submit(second, hint="g")
        with pytest.raises(QueueFullError, match="2 questions waiting"):
            scheduler.submit(request(3), hint="g")
        with pytest.raises(QueueFullError):
            scheduler.submit_group([request(4)])
        scheduler.abort(first)  # still waiting: it leaves the queue, no engine abort needed
        assert worker.unscheduled == [first] and not first.member.aborted
        scheduler.submit(request(5), hint="g")
        assert scheduler.num_in_flight == 2
        await scheduler.stop()
        assert len(worker.unscheduled) == 3  # stop() ends what still waits

    asyncio.run(scenario())


def test_abort_of_a_running_request_reaches_its_member():
    async def scenario():
        worker = FakeWorker(release=asyncio.Event())
        scheduler, metrics = make_scheduler(worker)
        scheduler.start()
        running = request(1)
        scheduler.submit(running, hint=None)
        await wait_until(lambda: worker.batches)
        assert scheduler.num_in_flight == 1 and metrics.sizes[-1] == (0, 1)
        scheduler.abort(running)
        assert running.member.aborted and worker.unscheduled == []
        worker.release.set()
        await wait_until(lambda: scheduler.num_in_flight == 0)
        await scheduler.stop()

    asyncio.run(scenario())


def test_ready_groups_wait_while_a_batch_runs_then_run_together():
    async def scenario():
        worker = FakeWorker(release=asyncio.Event())
        scheduler, _ = make_scheduler(worker, max_batch_groups=2)
        scheduler.start()
        scheduler.submit(request(1), hint=None)
        await wait_until(lambda: len(worker.batches) == 1)
        later = [request(2), request(3), request(4)]
        for item in later:
            scheduler.submit(item, hint=None)
        await asyncio.sleep(0.02)
        assert len(worker.batches) == 1  # one batch at a time: the engine has one thread
        worker.release.set()
        await wait_until(lambda: len(worker.batches) == 3)
        assert worker.batches[1] == [[later[0]], [later[1]]]  # capped at max_batch_groups
        await scheduler.stop()

    asyncio.run(scenario())


def test_closing_open_groups_makes_them_ready_and_stops_joining():
    queue = make_queue(max_wait_s=60.0)
    queue.add("a", "k", now=0.0)
    queue.close_open_groups()
    queue.add("b", "k", now=0.0)  # a new group: the closed one takes no one
    assert queue.take_batch(now=0.0) == [["a"]]
    assert queue.take_batch(now=1.0) == []


def test_drain_runs_waiting_groups_at_once():
    async def scenario():
        worker = FakeWorker()
        scheduler, _ = make_scheduler(worker, max_wait_s=60.0)
        scheduler.start()
        waiting = request(1)
        scheduler.submit(waiting, hint="g")
        await asyncio.sleep(0.02)
        assert worker.batches == []
        scheduler.drain_soon()
        await wait_until(lambda: worker.batches == [[[waiting]]])
        await scheduler.stop()

    asyncio.run(scenario())
