"""The grouped engine against an independent reference: plain, unbatched, cache-free greedy
decoding of each prompt alone on the same tiny random model."""

from __future__ import annotations

import pytest
import torch

from model.engine.grouped_engine import GroupedEngine
from model.engine.limits import shared_prefix_length
from model.engine.request import EngineInputError, Member, SamplingParams
from model.forward import cpu_kernels
from model.head.group_head import GroupHead, GroupHeadConfig
from server.prompts import encode_chat, question_messages

CONTEXTS = [
    "The cat sat on the mat while the dog slept by the fire.",
    "Paris is the capital of France; it lies on the Seine and has many museums.",
    "Water boils at one hundred degrees Celsius at sea level.",
]
QUESTIONS = ["Who sat?", "Where did the dog sleep, and why there?", "What?", "Is it warm?",
             "Which animal slept by the fire in the evening?"]


def prompts_for(tiny, context: str, count: int) -> list[list[int]]:
    return [encode_chat(tiny.tokenizer, question_messages(context, q)) for q in QUESTIONS[:count]]


def reference_greedy(model, prompt: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    """Full recomputation at every step: no cache, no padding, no batching."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids], device=model.device)).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stop_ids:
                break
    return out


def run(engine: GroupedEngine, groups: list[list[Member]]) -> dict:
    """-> {member: {"ids", "text", "finish", "usage"}} from the event stream."""
    results = {m: {"ids": [], "text": "", "finish": None, "usage": None} for g in groups for m in g}
    for event in engine.generate(groups):
        result = results[event.member]
        assert result["finish"] is None, "no event after a member's last one"
        if event.token_id is not None:
            result["ids"].append(event.token_id)
        result["text"] += event.text
        result["finish"], result["usage"] = event.finish_reason, event.usage
    return results


def make_groups(tiny, sizes: list[int], max_tokens: int = 10) -> list[list[Member]]:
    params = SamplingParams(max_tokens=max_tokens)
    return [
        [Member(p, params) for p in prompts_for(tiny, CONTEXTS[i % len(CONTEXTS)], size)]
        for i, size in enumerate(sizes)
    ]


@pytest.mark.parametrize("csa_kind", ["off", "untrained"])
@pytest.mark.parametrize("sizes", [[1], [2], [3], [4], [5], [5, 1, 3]])
def test_every_member_gets_its_unbatched_greedy_answer(tiny, sizes, csa_kind):
    hidden = tiny.model.config.hidden_size
    csa = GroupHead(GroupHeadConfig(hidden_size=hidden)) if csa_kind == "untrained" else None
    engine = GroupedEngine(tiny.model, tiny.tokenizer, csa)
    groups = make_groups(tiny, sizes)
    results = run(engine, groups)
    for member in (m for g in groups for m in g):
        expected = reference_greedy(tiny.model, member.prompt_ids, 10, engine.eos_token_ids)
        assert results[member]["ids"] == expected
        assert results[member]["finish"] in ("stop", "length")


def test_torch_ops_in_place_of_the_cpu_kernels_give_the_same_answers(tiny, monkeypatch):
    """The path CUDA and compiler-less machines take: torch's attention, norm and rotary."""
    monkeypatch.setattr(cpu_kernels, "usable_for", lambda *_: False)
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    groups = make_groups(tiny, [5, 1, 3])
    results = run(engine, groups)
    for member in (m for g in groups for m in g):
        expected = reference_greedy(tiny.model, member.prompt_ids, 10, engine.eos_token_ids)
        assert results[member]["ids"] == expected


def test_prompts_in_a_group_really_differ_in_length(tiny):
    lengths = {len(p) for p in prompts_for(tiny, CONTEXTS[0], 5)}
    assert len(lengths) == 5


def count_prompt_tokens_run(engine: GroupedEngine) -> list[int]:
    """Wraps the engine's forward pass: the returned list grows by the prompt tokens (prefill
    tokens) each step really runs through the model."""
    counts, forward = [], engine.forward

    def counting(step, kv):
        counts.append(len(step.token_ids) - step.num_decode_rows)
        return forward(step, kv)

    engine.forward = counting
    engine.forward.scale = forward.scale
    return counts


def common_length(a, b) -> int:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return length


def test_usage_adds_up_to_the_tokens_really_computed(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    counts = count_prompt_tokens_run(engine)
    groups = make_groups(tiny, [4, 1, 2], max_tokens=6)
    results = run(engine, groups)
    usages = [results[m]["usage"] for g in groups for m in g]
    assert sum(u.prompt_tokens for u in usages) == sum(len(m.prompt_ids) for g in groups for m in g)
    assert sum(u.computed_prompt_tokens for u in usages) == sum(counts)
    # each group computes its shared prefix once, less what an earlier group already holds
    # (the common system prompt), and every member its own rest of prompt
    expected, earlier = 0, []
    for group in groups:
        prompts = [m.prompt_ids for m in group]
        prefix = shared_prefix_length(prompts)
        reused = max((common_length(prompts[0][:prefix], e) for e in earlier), default=0)
        expected += prefix - reused + sum(len(p) - prefix for p in prompts)
        earlier.append(prompts[0][:prefix])
        group_usages = [results[m]["usage"] for m in group]
        assert group_usages[0].cached_tokens == reused
        assert all(u.cached_tokens == prefix for u in group_usages[1:])
        for member, usage in zip(group, group_usages):
            assert usage.completion_tokens == len(results[member]["ids"])
    assert expected == sum(counts)
    assert results[groups[0][0]]["usage"].cached_tokens == 0
    assert results[groups[1][0]]["usage"].cached_tokens > 0, "the system prompt is reused"


def test_shared_prefix_leaves_every_prompt_a_suffix():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 8, 9]]) == 2
    assert shared_prefix_length([[1], [1, 2]]) == 0
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_groups_without_a_common_prefix_share_a_batch_with_groups_that_have_one(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    params = SamplingParams(max_tokens=5)
    lone = [Member([5, 6, 7], params), Member([9, 6], params)]  # no common prefix
    groups = [lone, make_groups(tiny, [3], max_tokens=5)[0]]
    results = run(engine, groups)
    for member in (m for g in groups for m in g):
        expected = reference_greedy(tiny.model, member.prompt_ids, 5, engine.eos_token_ids)
        assert results[member]["ids"] == expected


def test_text_is_the_decoded_tokens(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    groups = make_groups(tiny, [3], max_tokens=12)
    for result in run(engine, groups).values():
        ids = [t for t in result["ids"] if t not in engine.eos_token_ids]
        assert result["text"] == tiny.tokenizer.decode(ids, skip_special_tokens=True)


def test_max_tokens_ends_with_length(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    groups = make_groups(tiny, [2], max_tokens=3)
    for member, result in run(engine, groups).items():
        assert result["ids"] == reference_greedy(tiny.model, member.prompt_ids, 3, set())
        assert result["finish"] == "length"
        assert result["usage"].completion_tokens == 3


def test_stop_string_cuts_the_text_before_it(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompt = prompts_for(tiny, CONTEXTS[1], 1)[0]
    free = run(engine, [[Member(prompt, SamplingParams(max_tokens=20))]])
    text = next(iter(free.values()))["text"]
    assert len(text) >= 8, "the tiny model must produce some text for this test"
    stop = text[4:7]
    stopped = run(engine, [[Member(prompt, SamplingParams(max_tokens=20, stop=(stop,)))]])
    result = next(iter(stopped.values()))
    assert result["finish"] == "stop"
    assert result["text"] == text[: text.find(stop)]
    assert len(result["ids"]) < 20


def test_stop_token_id_ends_the_member(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompt = prompts_for(tiny, CONTEXTS[2], 1)[0]
    free = next(iter(run(engine, [[Member(prompt, SamplingParams(max_tokens=12))]]).values()))
    stop_id = free["ids"][3]
    cut = free["ids"].index(stop_id)
    params = SamplingParams(max_tokens=12, stop_token_ids=(stop_id,))
    result = next(iter(run(engine, [[Member(prompt, params)]]).values()))
    assert result["ids"] == free["ids"][: cut + 1]
    assert result["finish"] == "stop"


def test_abort_ends_one_member_and_leaves_the_others_untouched(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    group = make_groups(tiny, [3], max_tokens=10)[0]
    results = {m: [] for m in group}
    finishes = {}
    for event in engine.generate([group]):
        if event.token_id is not None:
            results[event.member].append(event.token_id)
        if len(results[group[1]]) == 2:
            group[1].abort()
        if event.finish_reason:
            finishes[event.member] = event.finish_reason
    assert finishes[group[1]] == "abort"
    assert len(results[group[1]]) == 2
    for member in (group[0], group[2]):
        assert results[member] == reference_greedy(
            tiny.model, member.prompt_ids, 10, engine.eos_token_ids
        )


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompt = prompts_for(tiny, CONTEXTS[0], 1)[0]
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = run(engine, [[Member(prompt, params)]])
    member = Member(prompt, params)
    crowded = run(engine, make_groups(tiny, [3]) + [[member]])
    assert crowded[member]["ids"] == next(iter(alone.values()))["ids"]
    other = run(engine, [[Member(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=8))]])
    assert next(iter(other.values()))["ids"] != crowded[member]["ids"]


def test_trained_csa_keeps_groups_apart(tiny):
    """A CSA with non-zero weights changes answers inside a group, but never across groups,
    and a group of one is decoded exactly as alone."""
    torch.manual_seed(3)
    csa = GroupHead(GroupHeadConfig(hidden_size=tiny.model.config.hidden_size, num_heads=4))
    torch.nn.init.normal_(csa.o_proj.weight, std=2.0)
    torch.nn.init.constant_(csa.gate_out.bias, 3.0)
    engine = GroupedEngine(tiny.model, tiny.tokenizer, csa)
    group_a, group_b, single = make_groups(tiny, [3, 4, 1], max_tokens=8)
    together = run(engine, [group_a, group_b, single])
    apart = run(engine, [group_a])
    for member in group_a:
        assert together[member]["ids"] == apart[member]["ids"]
    expected_single = reference_greedy(tiny.model, single[0].prompt_ids, 8, engine.eos_token_ids)
    assert together[single[0]]["ids"] == expected_single
    plain = run(GroupedEngine(tiny.model, tiny.tokenizer), [group_a])
    assert any(plain[m]["ids"] != apart[m]["ids"] for m in group_a), "CSA must act in a group"


def test_a_step_mixing_grouped_and_plain_rows_gives_each_its_own_head(tiny):
    """Rows of a group that chose grouped QA get the trained head, rows beside them in the
    same steps the bare LM head: each answers as it would with only its own kind running."""
    torch.manual_seed(4)
    csa = GroupHead(GroupHeadConfig(hidden_size=tiny.model.config.hidden_size, num_heads=4,
                                    adapter_rank=4, vocab_size=tiny.model.config.vocab_size))
    torch.nn.init.normal_(csa.o_proj.weight, std=2.0)
    torch.nn.init.normal_(csa.adapter_up.weight, std=2.0)
    grouped, plain = make_groups(tiny, [3, 2], max_tokens=8)
    engine = GroupedEngine(tiny.model, tiny.tokenizer, csa)
    engine.add(grouped, uses_trained_head=True)
    engine.add(plain, uses_trained_head=False)
    mixed: dict = {m: [] for m in grouped + plain}
    while engine.has_work:
        for event in engine.step():
            if event.token_id is not None:
                mixed[event.member].append(event.token_id)
    with_head = run(engine, [[Member(m.prompt_ids, m.params) for m in grouped]])
    without = run(GroupedEngine(tiny.model, tiny.tokenizer), [plain])
    assert [mixed[m] for m in grouped] == [r["ids"] for r in with_head.values()]
    assert [mixed[m] for m in plain] == [without[m]["ids"] for m in plain]
    bare = [reference_greedy(tiny.model, m.prompt_ids, 8, engine.eos_token_ids) for m in grouped]
    assert [mixed[m] for m in grouped] != bare, "the trained head must act on the group"


@pytest.mark.parametrize(
    ("groups_of", "message"),
    [
        (lambda tiny: [[]], "no members"),
        (lambda tiny: [[Member([], SamplingParams())]], "empty"),
        (lambda tiny: [[Member([1, 2], SamplingParams(max_tokens=0))]], "max_tokens"),
        (lambda tiny: [[Member([1] * 4090, SamplingParams(max_tokens=10))]], "4100 were"),
        (lambda tiny: [[Member([1] * 5000, SamplingParams(max_tokens=1))]], "length is 4096"),
        (lambda tiny: [[Member([10**6], SamplingParams())]], "vocabulary"),
        (lambda tiny: [[Member([1, 2], SamplingParams(temperature=-1))]], "temperature"),
        (lambda tiny: [[Member([1, 2], SamplingParams(stop=("",)))]], "stop"),
    ],
)
def test_bad_input_raises_a_clear_error(tiny, groups_of, message):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    with pytest.raises(EngineInputError, match=message):
        list(engine.generate(groups_of(tiny)))
