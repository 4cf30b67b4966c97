"""The engine's policy (model/engine/scheduler.py) on token ids alone: no model, no tensors.
A fake step loop stands in for the forward and sampling: every decoding row gets token 7."""

from __future__ import annotations

from model.engine.groups import Group
from model.engine.request import Member, SamplingParams, Status
from model.engine.scheduler import Scheduler, StepWork

SYSTEM = list(range(100, 120))  # a prompt prefix every test prompt shares


def member(*suffix: int, max_tokens: int = 3) -> Member:
    return Member([*SYSTEM, *suffix], SamplingParams(max_tokens=max_tokens))


def add(scheduler: Scheduler, *members: Member) -> Group:
    group = Group(list(members), uses_trained_head=True)
    scheduler.add(group)
    return group


def step(scheduler: Scheduler) -> StepWork:
    """One step as the engine runs it, with token 7 for every row that decodes."""
    work = scheduler.schedule()
    scheduler.complete(work)
    for row in work.decode_rows + scheduler.starting_rows():
        row.output_ids.append(7)
        if len(row.output_ids) == row.member.params.max_tokens:
            scheduler.finish(row)
    return work


def run_all(scheduler: Scheduler) -> list[StepWork]:
    steps = []
    while scheduler.has_work:
        steps.append(step(scheduler))
        assert len(steps) < 1000
    return steps


def test_a_group_computes_its_shared_prefix_once_then_each_rest():
    scheduler = Scheduler(capacity=1000, max_prefill_tokens=1000)
    group = add(scheduler, member(1, 2, 3), member(1, 2, 4, 5), member(9))
    work = scheduler.schedule()
    lengths = [(c.job.row is None, c.length) for c in work.chunks]
    # the common prefix (SYSTEM) once, then each member's rest of prompt
    assert lengths == [(True, 20), (False, 3), (False, 4), (False, 1)]
    assert group.prefix_length == 20
    assert [r.cached_tokens for r in group.rows] == [0, 20, 20]
    assert all(m.status is Status.PREFILL for m in group.members)


def test_rows_start_together_when_every_prompt_of_their_group_is_computed():
    scheduler = Scheduler(capacity=1000, max_prefill_tokens=22)
    group = add(scheduler, member(1, 2), member(3, 4, 5, 6, 7, 8))
    first = step(scheduler)  # the prefix (20) and the first row's 2 tokens
    assert [c.length for c in first.chunks] == [20, 2]
    assert not scheduler.decoding_rows()
    assert [m.status for m in group.members] == [Status.PREFILL, Status.PREFILL]
    step(scheduler)  # the second row's prompt: now both start, in one step
    assert [m.status for m in group.members] == [Status.DECODE, Status.DECODE]
    assert [len(r.output_ids) for r in group.rows] == [1, 1]
    third = step(scheduler)
    assert third.decode_rows == group.rows and not third.chunks


def test_prefill_is_chunked_to_the_step_budget_in_order_beside_decoding_rows():
    scheduler = Scheduler(capacity=1000, max_prefill_tokens=8)
    early = add(scheduler, member(1, max_tokens=50))
    run_until = 0
    while not scheduler.decoding_rows():
        step(scheduler)
        run_until += 1
    late = add(scheduler, member(*range(30)))
    budgets = []
    while late.rows == [] or late.members[0].status is Status.PREFILL:
        work = step(scheduler)
        assert work.decode_rows == early.rows  # the running row decodes every step
        budgets.append(sum(c.length for c in work.chunks))
    # the late prompt's 30 uncached tokens, 8 a step
    assert budgets == [8, 8, 8, 6]


def test_the_oldest_group_waits_for_room_and_no_later_one_overtakes_it():
    scheduler = Scheduler(capacity=60, max_prefill_tokens=100)
    running = add(scheduler, member(1, max_tokens=20))  # 20 + 1 + 20 slots
    big = add(scheduler, member(2, 3, max_tokens=30))  # needs 2 + 30 more: not now
    small = add(scheduler, member(4, max_tokens=1))  # would fit, but waits behind `big`
    step(scheduler)
    assert running.rows and not big.rows and not small.rows
    assert scheduler.counters().num_waiting == 2
    run_all(scheduler)
    assert all(m.status is Status.FINISHED for g in (running, big, small) for m in g.members)


def test_finished_rows_leave_their_prompts_cached_and_free_the_rest():
    scheduler = Scheduler(capacity=200, max_prefill_tokens=100)
    add(scheduler, member(1, 2, max_tokens=5))
    run_all(scheduler)
    cached = scheduler.cache.num_cached_tokens
    # the prompt and the generated tokens that were fed back (the last one never is)
    assert cached == len(SYSTEM) + 2 + 4
    assert scheduler.slots.num_free + cached == 200
    again = add(scheduler, member(1, 2, max_tokens=5))
    work = scheduler.schedule()
    assert again.rows[0].cached_tokens == len(SYSTEM) + 1  # all but the last prompt token
    assert [c.length for c in work.chunks] == [1]


def test_aborted_members_leave_waiting_and_running_groups():
    scheduler = Scheduler(capacity=45, max_prefill_tokens=100)
    running = add(scheduler, member(1, max_tokens=10), member(2, max_tokens=10))
    waiting = add(scheduler, member(3, max_tokens=10), member(4, max_tokens=10))
    step(scheduler)
    assert running.rows and not waiting.rows
    left_running, left_waiting = running.members[0], waiting.members[1]
    left_running.abort()
    left_waiting.abort()
    events = scheduler.drop_aborted()
    assert [(e.member, e.finish_reason) for e in events] == [
        (left_running, "abort"), (left_waiting, "abort")]
    assert events[0].usage.prompt_tokens == 21 and events[1].usage.completion_tokens == 0
    assert left_waiting not in waiting.members and len(waiting.members) == 1
    run_all(scheduler)
    assert running.members[1].status is Status.FINISHED
    assert waiting.members[0].status is Status.FINISHED


def test_a_waiting_group_whose_members_all_left_is_dropped():
    scheduler = Scheduler(capacity=45, max_prefill_tokens=100)
    add(scheduler, member(1, max_tokens=20))
    gone = add(scheduler, member(2, max_tokens=20))
    step(scheduler)
    gone.members[0].abort()
    scheduler.drop_aborted()
    assert list(scheduler.waiting) == []


def test_reset_forgets_everything_and_returns_who_was_in():
    scheduler = Scheduler(capacity=45, max_prefill_tokens=100)
    running = add(scheduler, member(1, max_tokens=20))
    waiting = add(scheduler, member(2, max_tokens=20))
    step(scheduler)
    members = scheduler.reset()
    assert members == [*waiting.members, *running.members]
    assert all(m.status is Status.FINISHED for m in members)
    assert scheduler.slots.num_free == 45 and not scheduler.has_work


def test_usage_counters_count_prompt_tokens_looked_up_and_found():
    scheduler = Scheduler(capacity=500, max_prefill_tokens=500)
    add(scheduler, member(1), member(2))
    run_all(scheduler)
    counters = scheduler.counters()
    assert counters.prefix_cache_queries == 2 * 21
    assert counters.prefix_cache_hits == 20  # the second member's share of the prefix
    assert counters.kv_cache_usage == 0.0  # nothing runs; what is cached can be evicted
