"""Prompt-lookup speculation: a row writes exactly what it writes without it (greedy token for
token, seeded sampling draw for draw), every stop condition holds, no KV slot is lost, and the
cost model holds proposals back when they do not pay. The engine tests use the tiny model with
a cost model that always finds a proposal worth verifying. The tiny model is random and copies
nothing, so most engine tests propose from an oracle: each prompt's true greedy continuation,
every other proposal with its last token wrong, so that verification accepts and rejects."""

from __future__ import annotations

import itertools
from dataclasses import replace
from fractions import Fraction

import pytest
import torch

from model.engine import speculation
from model.engine.grouped_engine import GroupedEngine
from model.engine.groups import Group, Row
from model.engine.prefix_cache import PrefixCache
from model.engine.proposer import NgramIndex
from model.engine.request import Member, SamplingParams, Status
from model.engine.sampling import accept
from model.engine.slots import SlotAllocator
from model.engine.speculation import Speculation, SpeculationOptions, StepCost
from model.head.group_head import GroupHead, GroupHeadConfig
from model.weights.loading import load_model
from tests.test_engine import CONTEXTS, make_groups, run


class Verifying(StepCost):
    """A step whose fixed part dwarfs its tokens' cost, whatever the steps measure: every
    proposal is worth verifying."""

    def __init__(self):
        super().__init__(token_share=1e-6)

    def observe(self, tokens: int, seconds: float) -> None:
        pass


class Oracle:
    """Stands in for prompt lookup (`model.engine.speculation.propose`): the next tokens of the
    row's prompt's free continuation (as its params sample, past every stop), every other
    proposal with its last token changed."""

    def __init__(self, tiny, members: list[Member], length: int = 40):
        engine = GroupedEngine(tiny.model, tiny.tokenizer)
        members = [Member(m.prompt_ids, replace(m.params, max_tokens=length, stop=(),
                                                stop_token_ids=(), ignore_eos=True))
                   for m in members]
        answers = run(engine, [[m] for m in members])
        self.continuations = {tuple(m.prompt_ids): answers[m]["ids"] for m in members}
        self.num_proposals = 0

    def __call__(self, own: NgramIndex, siblings, limit: int) -> tuple[int, list[int]]:
        prompt = max((p for p in self.continuations if tuple(own.tokens[: len(p)]) == p), key=len)
        done = len(own.tokens) - len(prompt)
        proposal = list(self.continuations[prompt][done : done + limit])
        self.num_proposals += 1
        if proposal and self.num_proposals % 2 == 0:
            proposal[-1] ^= 1
        return speculation.MAX_NGRAM, proposal


@pytest.fixture
def oracle_for(tiny, monkeypatch):
    def install(groups: list[list[Member]]) -> Oracle:
        oracle = Oracle(tiny, [m for g in groups for m in g])
        monkeypatch.setattr(speculation, "propose", oracle)
        return oracle
    return install


def engine_for(tiny, speculate: bool, **kwargs) -> GroupedEngine:
    engine = GroupedEngine(tiny.model, tiny.tokenizer, speculate=speculate, **kwargs)
    engine.scheduler.speculation.cost = Verifying()
    return engine


def both_ways(tiny, groups_of, **kwargs) -> tuple[dict, dict, GroupedEngine]:
    """The results of the same groups without and with speculation, by member order."""
    results = []
    for speculate in (False, True):
        engine = engine_for(tiny, speculate, **kwargs)
        groups = groups_of()
        by_member = run(engine, groups)
        results.append([by_member[m] for g in groups for m in g])
    return results[0], results[1], engine


def test_greedy_answers_are_identical_with_and_without_speculation(tiny, oracle_for):
    """Grouped, alone, and rows that leave early: token for token, text and usage too; most
    proposed tokens were accepted, and some rejected."""
    groups = lambda: make_groups(tiny, [5, 1, 3], max_tokens=24)  # noqa: E731
    oracle_for(groups())
    off, on, engine = both_ways(tiny, groups)
    assert on == off
    counters = engine.counters()
    assert counters.num_accepted_tokens > counters.num_draft_tokens / 2
    assert counters.num_accepted_tokens < counters.num_draft_tokens
    # a row's first token comes from its prompt's last position, the rest from decode steps
    assert counters.num_decode_tokens == sum(len(r["ids"]) - 1 for r in on)
    assert counters.num_row_steps < counters.num_decode_tokens / 2


def test_prompt_lookup_changes_no_answer(tiny):
    """The real proposer, whose guesses the random model mostly rejects."""
    off, on, engine = both_ways(tiny, lambda: make_groups(tiny, [5, 1, 3], max_tokens=24))
    assert on == off
    assert engine.counters().num_drafts > 10


def test_groups_joining_mid_run_get_the_same_tokens_with_speculation(tiny, oracle_for):
    params = SamplingParams(max_tokens=20)
    prompts = [tiny.tokenizer.encode(f"{c} Question {i}?") for i, c in enumerate(CONTEXTS)]
    oracle = oracle_for([[Member(p, params) for p in prompts]])
    answers = []
    for speculate in (False, True):
        engine = engine_for(tiny, speculate)
        members = [Member(p, params) for p in prompts]
        engine.add([members[0]])
        tokens = {m: [] for m in members}
        for step in itertools.count():
            if step in (2, 5):
                engine.add([members[1 if step == 2 else 2]])
            for event in engine.step():
                if event.token_id is not None:
                    tokens[event.member].append(event.token_id)
            if not engine.has_work:
                break
        answers.append([tokens[m] for m in members])
    assert answers[0] == answers[1]
    assert oracle.num_proposals > 5


def test_seeded_sampling_is_reproducible_and_speculation_changes_no_draw(tiny, oracle_for):
    def groups():
        params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=11)
        return [[Member(m.prompt_ids, params) for m in make_groups(tiny, [3])[0]]]

    oracle_for(groups())
    off, on, engine = both_ways(tiny, groups)
    again = run(engine_for(tiny, True), groups())
    assert on == off
    assert list(again.values()) == on
    assert engine.counters().num_accepted_tokens > 0


def stop_params(kind: str, continuation: list[int], tokenizer) -> SamplingParams:
    """A stop of `kind` that the free continuation meets a few tokens in."""
    if kind == "length":
        return SamplingParams(max_tokens=7)
    if kind == "token id":
        return SamplingParams(max_tokens=30, stop_token_ids=(continuation[6],))
    text = tokenizer.decode(continuation)
    at = next(i for i in range(6, len(text)) if text[i : i + 2].isascii()
              and text[i : i + 2].isalnum())
    return SamplingParams(max_tokens=30, stop=(text[at : at + (1 if kind == "string" else 2)],))


@pytest.mark.parametrize("kind", ["length", "token id", "string", "string across tokens"])
def test_every_stop_condition_holds_exactly_as_without_speculation(tiny, oracle_for, kind):
    """The oracle proposes the continuation past the stop: the row still stops where it would."""
    plain = make_groups(tiny, [4, 2])
    oracle = oracle_for(plain)
    first = oracle.continuations[tuple(plain[0][0].prompt_ids)]
    params = stop_params(kind, first, tiny.tokenizer)

    def groups():
        return [[Member(m.prompt_ids, params) for m in g] for g in plain]

    off, on, engine = both_ways(tiny, groups)
    assert on == off
    counters = engine.counters()
    assert counters.num_accepted_tokens > 0
    # a token accepted past a stop is not written, nor counted
    assert counters.num_decode_tokens == counters.num_row_steps + counters.num_accepted_tokens
    assert on[0]["finish"] == ("length" if kind == "length" else "stop")
    assert len(on[0]["ids"]) < len(first)


def test_groups_the_group_head_mixes_decode_in_lockstep_unspeculated(tiny, oracle_for):
    """A CSA group's rows see their peers at the same step: they never speculate, and answer
    as without speculation; a plain group in the same steps speculates."""
    csa = GroupHead(GroupHeadConfig(hidden_size=tiny.model.config.hidden_size))
    grouped, plain = make_groups(tiny, [3, 2], max_tokens=12)
    oracle_for([grouped, plain])
    answers = []
    for speculate in (False, True):
        engine = engine_for(tiny, speculate, csa=csa)
        members = [[Member(m.prompt_ids, m.params) for m in g] for g in (grouped, plain)]
        engine.add(members[0], uses_trained_head=True)
        engine.add(members[1], uses_trained_head=False)
        verified = set()
        observe = engine.scheduler.speculation.observe_verified

        def noting(row, proposed, accepted, observe=observe, verified=verified):
            verified.add(row.member)
            observe(row, proposed, accepted)

        engine.scheduler.speculation.observe_verified = noting
        tokens: dict = {m: [] for g in members for m in g}
        while engine.has_work:
            for event in engine.step():
                if event.token_id is not None:
                    tokens[event.member].append(event.token_id)
        answers.append([tokens[m] for g in members for m in g])
    assert answers[0] == answers[1]
    assert verified and verified <= set(members[1])


def test_a_step_that_computes_a_prompt_verifies_no_proposal(tiny, oracle_for):
    """A request's first token never waits for proposals to be checked: steps with prefill
    chunks carry none, and the decode steps between them do."""
    params = SamplingParams(max_tokens=20)
    prompts = [tiny.tokenizer.encode(f"{c} Question {i}?") for i, c in enumerate(CONTEXTS)]
    members = [Member(p, params) for p in prompts]
    oracle_for([members])
    engine = engine_for(tiny, True)
    works = []
    schedule = engine.scheduler.schedule

    def recording():
        works.append(schedule())
        return works[-1]

    engine.scheduler.schedule = recording
    engine.add([members[0]])
    for step in itertools.count():
        if step in (3, 6):
            engine.add([members[1 if step == 3 else 2]])
        engine.step()
        if not engine.has_work:
            break
    assert any(work.chunks and work.decode_rows for work in works)
    assert all(not work.proposals for work in works if work.chunks)
    assert any(work.proposals for work in works)


def test_no_kv_slot_is_lost_to_rejected_proposals(tiny, oracle_for):
    groups = lambda: make_groups(tiny, [5, 3, 2], max_tokens=24)  # noqa: E731
    oracle_for(groups())
    engine = engine_for(tiny, True, kv_cache_mb=0.5)
    free_at_start = engine.scheduler.slots.num_free
    run(engine, groups())
    counters = engine.counters()
    assert 0 < counters.num_accepted_tokens < counters.num_draft_tokens  # some were rejected
    assert counters.kv_cache_usage == 0.0  # only evictable cached prefixes hold slots
    cache = engine.scheduler.cache
    assert engine.scheduler.slots.num_free + cache.evictable_tokens() == free_at_start


def test_the_rejection_rule_keeps_the_distribution_exactly():
    """A tiny vocabulary, two positions, exact arithmetic: each position's token is drawn by
    inverse CDF from a uniform; every cell of the two uniforms is enumerated with its mass. The
    proposal is accepted with probability p(x) at each position, a rejected position writes a
    token of p without x (renormalized), and what is written is distributed as drawing each
    token from p, whatever the proposal."""
    p = [[Fraction(1, 2), Fraction(1, 4), Fraction(1, 8), Fraction(1, 8)],
         [Fraction(1, 10), Fraction(3, 5), Fraction(1, 5), Fraction(1, 10)]]
    for proposal in ([0, 1], [2, 3], [3, 0]):
        written: dict[tuple[int, ...], Fraction] = {}
        for cells in itertools.product(range(4), repeat=3):  # a token per position drawn
            mass = p[0][cells[0]] * p[1][cells[1]] * p[1][cells[2]]
            choose = [cells[0], cells[1], cells[2]].__getitem__
            key = tuple(accept(proposal, choose))
            written[key] = written.get(key, Fraction(0)) + mass
        first = proposal[0]
        accepted_first = sum(m for k, m in written.items() if k[0] == first and len(k) > 1)
        assert accepted_first == p[0][first]
        for token in range(4):
            if token != first:
                # rejected (mass 1 - p(x)), then drawn from p without x: p(t) / (1 - p(x))
                assert sum(m for k, m in written.items() if k == (token,)) == p[0][token]
        for a, b in itertools.product(range(4), repeat=2):  # two tokens: as drawn from p
            if a == first:
                mass = sum(m for k, m in written.items() if k[:2] == (a, b))
                assert mass == p[0][a] * p[1][b]


def group_of(prompts: list[list[int]], outputs: list[list[int]], max_tokens: int = 50):
    group = Group([Member(p, SamplingParams(max_tokens=max_tokens)) for p in prompts], False)
    leaf = PrefixCache(SlotAllocator(100)).root
    for member, output in zip(group.members, outputs):
        member.status = Status.DECODE
        row = Row(member, group, leaf, member.prompt_ids, 0, 100, 0)
        for token in output:
            row.write(token)
        group.rows.append(row)
    return group


def test_a_proposal_comes_from_a_siblings_answer():
    """The row's last tokens are nowhere in its own prompt and output, but a sibling wrote
    them: the sibling's continuation is proposed."""
    group = group_of([[1, 2, 3], [1, 2, 4]], [[50, 60, 70, 80, 90], [7, 50, 60]])
    speculation = Speculation(SpeculationOptions(max_tokens=3))
    speculation.cost = Verifying()
    proposals = speculation.proposals(group.rows, num_rows=2)
    assert proposals[group.rows[1]] == [70, 80, 90]
    assert group.rows[0] not in proposals  # "90" is new to everything it has seen


def test_a_proposal_never_carries_a_row_past_max_tokens():
    group = group_of([[5, 6, 7, 5, 6, 7, 5, 6]], [[7, 5]], max_tokens=5)
    speculation = Speculation(SpeculationOptions(max_tokens=8))
    speculation.cost = Verifying()
    (proposal,) = speculation.proposals(group.rows, num_rows=1).values()
    assert len(proposal) == 5 - 2 - 1  # room for the proposal and the token after it


def test_the_cost_model_speculates_where_a_step_is_bound_by_reading_weights_only():
    """One row on a step whose fixed part dominates: proposals pay. Forty rows on a step whose
    tokens dominate (a CPU computing many rows): none does at a middling acceptance rate."""
    group = group_of([[1, 2, 3, 1, 2, 3, 1, 2]] * 40, [[3]] * 40)
    memory_bound = Speculation(SpeculationOptions(token_share=0.05))
    assert memory_bound.proposals(group.rows[:1], num_rows=1)
    compute_bound = Speculation(SpeculationOptions(token_share=0.25))
    assert compute_bound.proposals(group.rows, num_rows=40) == {}


def test_proposals_are_as_long_as_matches_of_their_length_have_earned():
    """Proposals from a 3-token match were always accepted, those from a 1-token match never:
    the first get the whole proposal, the second none."""
    group = group_of([list(range(1, 12)), list(range(20, 29))], [[2, 3, 4], [30, 24]])
    sure, unsure = group.rows
    speculation = Speculation(SpeculationOptions(max_tokens=8, token_share=0.1))
    for _ in range(30):
        for row, proposal in speculation.proposals(group.rows, num_rows=2).items():
            speculation.observe_verified(row, len(proposal), len(proposal) if row is sure else 0)
    proposals = speculation.proposals(group.rows, num_rows=2)
    assert list(proposals) == [sure]
    assert proposals[sure] == [5, 6, 7, 8, 9, 10, 11, 2]  # what followed "2 3 4", 8 tokens
    assert speculation.chance(3, 5) > 0.9 and speculation.chance(1, 0) < 0.3


def test_the_step_cost_is_fitted_to_the_steps_seen():
    cost = StepCost(token_share=0.2)
    for tokens in [1, 4, 9, 1, 6, 2] * 30:
        cost.observe(tokens, 0.004 + 0.0005 * tokens)
    fixed, per_token = cost.line
    assert fixed == pytest.approx(0.004, rel=0.05)
    assert per_token == pytest.approx(0.0005, rel=0.1)
    steady = StepCost(token_share=0.2)
    for _ in range(500):
        steady.observe(1, 0.003)  # one token a step: the level is the steps', the slope a share
    fixed, per_token = steady.line
    assert fixed + per_token == pytest.approx(0.003)
    assert per_token / fixed == pytest.approx(0.2)


def test_a_verifying_rows_hidden_states_are_its_one_by_one_decode_states(capped_isa):
    """The promise speculation rests on: a row's tokens fed as one chunk after its last token
    give, bit for bit, the hidden states that feeding them one step at a time gives, on each
    kernel variant (the block kernels compute each row on its own, as the attention kernel each
    token; torch's fp32 linears do not promise it, for verification as for batching)."""
    loaded = load_model("tiny-random", device="cpu", weights="int4")
    engine = GroupedEngine(loaded.model, loaded.tokenizer)
    prompt = loaded.tokenizer.encode("The cat sat on the mat.")
    tokens = loaded.tokenizer.encode(" The dog sat too")[:5]
    chunk_states = decode_states(engine, prompt, [tokens])
    one_by_one = decode_states(engine, prompt, [[t] for t in tokens])
    assert torch.equal(chunk_states, one_by_one)


def decode_states(engine: GroupedEngine, prompt: list[int], feeds: list[list[int]]):
    """The final hidden states of `prompt`'s continuation fed in `feeds`, one feed a step."""
    from model.engine.batch import build_step
    from model.engine.scheduler import StepWork

    engine.scheduler.cache.clear()
    member = Member(prompt, SamplingParams(max_tokens=20))
    engine.add([member])
    work = engine.scheduler.schedule()
    inputs, _ = build_step(work, engine.forward.scale)
    engine.run_forward(inputs)
    engine.scheduler.complete(work)
    (row,) = engine.scheduler.starting_rows()
    states = []
    for feed in feeds:
        row.write(feed[0])
        work = StepWork([row], [], {row: feed[1:]} if len(feed) > 1 else {})
        inputs, _ = build_step(work, engine.forward.scale)
        states.append(engine.run_forward(inputs))
        engine.scheduler.complete(work)
        for token in feed[1:]:
            engine.scheduler.keep_proposed(row)
            row.write(token)
    member.abort()
    engine.step()
    return torch.cat(states)


def test_an_earlier_answer_of_the_same_tenant_is_a_source_and_anothers_never_is():
    speculation = Speculation(SpeculationOptions(max_tokens=3))
    speculation.cost = Verifying()
    (done,) = group_of([[1, 2, 3]], [[50, 60, 70, 80, 90]]).rows
    speculation.remember(done)
    (row,) = group_of([[4, 5, 6]], [[7, 60, 70]]).rows
    assert speculation.proposals([row], num_rows=1) == {row: [80, 90]}
    stranger = Group([Member([4, 5, 6], SamplingParams(max_tokens=50), namespace=("other", None))],
                     False)
    other = Row(stranger.members[0], stranger, row.leaf, [4, 5, 6], 0, 100, 0)
    other.write(60)
    stranger.rows.append(other)
    assert speculation.proposals([other], num_rows=1) == {}
