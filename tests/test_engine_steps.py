"""The step-level engine against the unbatched reference: groups that join a running batch,
rows that leave early, prefix-cache hits, eviction, chunked prefill, admission control,
tenant isolation and failure isolation (tiny random model, greedy, CSA off)."""

from __future__ import annotations

import pytest
import torch

import model.engine.sampling as sampling
from model.engine.grouped_engine import GroupedEngine
from model.engine.request import EngineInputError, Member, SamplingParams
from model.forward.decoder import PoolShape
from server.prompts import encode_chat, question_messages
from tests.test_engine import CONTEXTS, QUESTIONS, prompts_for, reference_greedy, run


def expected(tiny, engine, member) -> list[int]:
    return reference_greedy(tiny.model, member.prompt_ids, member.params.max_tokens,
                            engine.eos_token_ids)


def megabytes_for(tiny, tokens: int) -> float:
    config = tiny.model.config
    shape = PoolShape(config.num_hidden_layers, config.num_key_value_heads,
                      config.hidden_size // config.num_attention_heads)
    return tokens * shape.bytes_per_token(tiny.model.dtype) / 2**20


def members(prompts, max_tokens=8, **params) -> list[Member]:
    return [Member(p, SamplingParams(max_tokens=max_tokens, **params)) for p in prompts]


def drain(engine: GroupedEngine, results: dict, steps: int | None = None) -> list[list]:
    """Steps the engine (all of it, or `steps` steps); token ids per member into `results`.
    Returns the events of each step."""
    history = []
    while engine.has_work and (steps is None or len(history) < steps):
        events = engine.step()
        history.append(events)
        for event in events:
            entry = results.setdefault(event.member, {"ids": [], "finish": None, "usage": None})
            if event.token_id is not None:
                entry["ids"].append(event.token_id)
            if event.finish_reason:
                entry["finish"], entry["usage"] = event.finish_reason, event.usage
    return history


def test_groups_joining_a_running_batch_at_different_steps_get_their_own_answers(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    first = members(prompts_for(tiny, CONTEXTS[0], 3), max_tokens=12)
    second = members(prompts_for(tiny, CONTEXTS[1], 2), max_tokens=12)
    third = members(prompts_for(tiny, CONTEXTS[2], 1), max_tokens=12)
    results: dict = {}
    engine.add(first)
    drain(engine, results, steps=3)
    engine.add(second)
    drain(engine, results, steps=4)
    engine.add(third)
    drain(engine, results)
    assert any(results[m]["ids"] for m in first)
    for member in first + second + third:
        assert results[member]["ids"] == expected(tiny, engine, member)


def test_rows_that_leave_early_leave_the_others_untouched(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompts = prompts_for(tiny, CONTEXTS[0], 3)
    group = [Member(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, (1, 4, 14))]
    results = run(engine, [group])
    for member in group:
        assert results[member]["ids"] == expected(tiny, engine, member)
    assert [len(results[m]["ids"]) for m in group][:2] == [1, 4]


def test_the_same_prompt_twice_computes_only_its_last_token(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompt = prompts_for(tiny, CONTEXTS[1], 1)[0]
    first = run(engine, [members([prompt])])
    (first_result,) = first.values()
    (member,) = members([prompt])
    again = run(engine, [[member]])[member]
    assert again["ids"] == first_result["ids"] == expected(tiny, engine, member)
    assert first_result["usage"].cached_tokens == 0
    assert again["usage"].cached_tokens == len(prompt) - 1


def test_a_prompt_extending_a_cached_one_reuses_it_and_its_answer(tiny):
    """A second turn: the first prompt and the answer to it are in the cache."""
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompt = prompts_for(tiny, CONTEXTS[2], 1)[0]
    (turn,) = members([prompt], max_tokens=6)
    answer = run(engine, [[turn]])[turn]["ids"]
    follow_up = prompt + answer + tiny.tokenizer.encode("And then?", add_special_tokens=False)
    (second,) = members([follow_up])
    result = run(engine, [[second]])[second]
    assert result["ids"] == expected(tiny, engine, second)
    # the last answer token was sampled, never fed: its key and value were never computed
    assert result["usage"].cached_tokens == len(prompt) + len(answer) - 1


def test_a_match_ending_inside_a_cached_node_splits_it(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompt_a, prompt_b = prompts_for(tiny, CONTEXTS[0], 2)
    common = next(i for i, (a, b) in enumerate(zip(prompt_a, prompt_b)) if a != b)
    (first,) = members([prompt_a])
    run(engine, [[first]])
    (second,) = members([prompt_b])
    result = run(engine, [[second]])[second]
    assert result["ids"] == expected(tiny, engine, second)
    assert result["usage"].cached_tokens == common
    assert 0 < common < len(prompt_a) - 1  # the cached node ran past the shared part


def test_eviction_under_a_small_pool_keeps_answers_exact(tiny):
    prompts = [p for context in CONTEXTS for p in prompts_for(tiny, context, 2)]
    longest = max(len(p) for p in prompts)
    engine = GroupedEngine(tiny.model, tiny.tokenizer,
                           kv_cache_mb=megabytes_for(tiny, longest + 60))
    for prompt in prompts:  # one after another: later ones evict earlier prefixes
        (member,) = members([prompt])
        assert run(engine, [[member]])[member]["ids"] == expected(tiny, engine, member)
        assert engine.cache.num_cached_tokens <= engine.pool.capacity
    assert engine.scheduler.slots.num_free + engine.cache.num_cached_tokens == engine.pool.capacity
    (member,) = members([prompts[0]])
    assert run(engine, [[member]])[member]["usage"].cached_tokens < len(prompts[0]) - 1


def test_chunked_prefill_is_exact_and_lets_running_rows_decode(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer, max_prefill_tokens=16)
    (running,) = members(prompts_for(tiny, CONTEXTS[0], 1), max_tokens=40, ignore_eos=True)
    engine.add([running])
    results: dict = {}
    while not results.get(running, {}).get("ids"):
        drain(engine, results, steps=1)
    late = members(prompts_for(tiny, CONTEXTS[1], 3), max_tokens=8)
    engine.add(late)
    history = drain(engine, results)
    # steps while the late group's prompts are prefilled in chunks: the running row goes on
    before_late_tokens = [events for events in history
                          if not any(e.member in late and e.token_id is not None for e in events)]
    assert len(before_late_tokens) > 5
    assert all(any(e.member is running for e in events) for events in before_late_tokens)
    for member in [running, *late]:
        assert results[member]["ids"] == reference_greedy(
            tiny.model, member.prompt_ids, member.params.max_tokens,
            set() if member is running else engine.eos_token_ids)


def test_no_cache_hit_across_tenants_or_salts(tiny):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompt = prompts_for(tiny, CONTEXTS[0], 1)[0]

    def cached(namespace) -> int:
        member = Member(prompt, SamplingParams(max_tokens=2), namespace=namespace)
        return run(engine, [[member]])[member]["usage"].cached_tokens

    assert cached((0, None)) == 0
    assert cached((1, None)) == 0  # another tenant
    assert cached((0, "salt")) == 0  # the same tenant, another salt
    assert cached((0, None)) == len(prompt) - 1
    assert cached((1, None)) == len(prompt) - 1


def test_a_group_that_does_not_fit_waits_and_one_that_never_can_is_refused(tiny):
    prompts = prompts_for(tiny, CONTEXTS[0], 2) + prompts_for(tiny, CONTEXTS[1], 1)
    room = max(len(p) for p in prompts) + 20
    engine = GroupedEngine(tiny.model, tiny.tokenizer, kv_cache_mb=megabytes_for(tiny, room))
    first, second = members(prompts[:1], max_tokens=10), members(prompts[2:], max_tokens=10)
    engine.add(first)
    engine.add(second)  # both together need more than the pool: the second waits
    results: dict = {}
    history = drain(engine, results)
    finished_first = next(i for i, events in enumerate(history)
                          if any(e.member is first[0] and e.finish_reason for e in events))
    started_second = next(i for i, events in enumerate(history)
                          if any(e.member is second[0] and e.token_id is not None
                                 for e in events))
    assert started_second > finished_first
    for member in first + second:
        assert results[member]["ids"] == expected(tiny, engine, member)
    with pytest.raises(EngineInputError, match="--kv-cache-mb") as refused:
        engine.limits.check_group(members(prompts[:2], max_tokens=10))  # 2 prompts: never fits
    assert refused.value.param == "max_tokens"


def test_a_member_whose_sampler_fails_ends_alone(tiny, monkeypatch):
    engine = GroupedEngine(tiny.model, tiny.tokenizer)
    prompts = prompts_for(tiny, CONTEXTS[0], 3)
    doomed = Member(prompts[1], SamplingParams(max_tokens=8, temperature=0.5, seed=3))
    group = [Member(prompts[0], SamplingParams(max_tokens=8)), doomed,
             Member(prompts[2], SamplingParams(max_tokens=8))]
    real = sampling.sample_token

    def failing(logits, params, generator):
        if params is doomed.params:
            raise FloatingPointError("probabilities are not finite")
        return real(logits, params, generator)

    monkeypatch.setattr(sampling, "sample_token", failing)
    events = list(engine.generate([group]))
    last = {e.member: e for e in events if e.finish_reason}
    assert last[doomed].finish_reason == "error"
    assert "probabilities are not finite" in last[doomed].error
    for member in (group[0], group[2]):
        ids = [e.token_id for e in events if e.member is member and e.token_id is not None]
        assert ids == expected(tiny, engine, member)
        assert last[member].finish_reason in ("stop", "length")


def test_a_request_is_admitted_when_exactly_its_worst_case_fits(tiny):
    prompt = prompts_for(tiny, CONTEXTS[1], 1)[0]
    tokens = len(prompt) + 6  # every prompt token and max_tokens
    engine = GroupedEngine(tiny.model, tiny.tokenizer, kv_cache_mb=megabytes_for(tiny, tokens))
    assert engine.pool.capacity == tokens
    (member,) = members([prompt], max_tokens=6)
    assert run(engine, [[member]])[member]["ids"] == expected(tiny, engine, member)


def test_qwen2_with_its_q_k_v_biases_decodes_as_the_reference(device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from model.weights.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        initializer_range=0.3, tie_word_embeddings=False, rope_theta=1e6,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    for layer in qwen.model.layers:  # biases that matter, so a forward that drops them fails
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                           layer.self_attn.v_proj):
            torch.nn.init.normal_(projection.bias, std=1.0)
    qwen.to(device, dtype)
    engine = GroupedEngine(qwen, tokenizer)
    group = members([encode_chat(tokenizer, question_messages(CONTEXTS[0], q))
                     for q in QUESTIONS[:3]])
    results = run(engine, [group])
    for member in group:
        assert results[member]["ids"] == reference_greedy(qwen, member.prompt_ids, 8,
                                                          engine.eos_token_ids)
