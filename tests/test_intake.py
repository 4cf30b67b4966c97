"""The edge check (server/intake.py) on its own: a request becomes the groups the grouping runs,
each member checked once against the engine's limits, with the field the client sent named
when one is refused. No engine: the limits are a frozen object."""

from __future__ import annotations

import asyncio

import pytest

from model.engine.interface import EngineInputError, EngineLimits
from model.weights.tiny import build_tiny_tokenizer
from server.intake import chat_member, grouped_members
from server.prompts import PromptEncoder, encode_chat, question_messages
from server.schemas import ChatCompletionRequest, GroupedCompletionRequest
from server.services import ServedModel

TOKENIZER = build_tiny_tokenizer()
LIMITS = EngineLimits(max_context=1000, kv_capacity=1200, vocab_size=len(TOKENIZER))
MODEL = ServedModel("tiny-random", LIMITS, PromptEncoder(TOKENIZER))
PASSAGE = "The Amazon basin spans nine nations."


def grouped(max_group_size: int = 8, **body):
    request = GroupedCompletionRequest(**{"context": PASSAGE, "max_tokens": 8, **body})
    return asyncio.run(grouped_members(request, ("tenant", None), MODEL, max_group_size))


def test_a_grouped_request_becomes_groups_of_at_most_max_group_size_in_order():
    questions = [f"Question {i}?" for i in range(5)]
    groups = grouped(max_group_size=2, questions=questions)
    assert [len(group) for group in groups] == [2, 2, 1]
    members = [m for group in groups for m in group]
    assert [m.prompt_ids for m in members] == [
        encode_chat(TOKENIZER, question_messages(PASSAGE, q)) for q in questions]
    assert all(m.namespace == ("tenant", None) and m.params.max_tokens == 8 for m in members)


def test_every_member_is_checked_once(monkeypatch):
    calls = {"member": 0, "room": 0}
    check_member, check_room = EngineLimits.check_member, EngineLimits.check_room

    def counting(name, check):
        def counted(limits, *args):
            calls[name] += 1
            return check(limits, *args)
        return counted

    monkeypatch.setattr(EngineLimits, "check_member", counting("member", check_member))
    monkeypatch.setattr(EngineLimits, "check_room", counting("room", check_room))
    grouped(max_group_size=2, questions=["a?", "b?", "c?"])
    assert calls == {"member": 3, "room": 2}


@pytest.mark.parametrize(
    ("body", "param", "starts"),
    [
        ({"context": "x" * 1000, "questions": ["a", "b"]}, "context", "context: "),
        ({"questions": ["a", "x" * 1000]}, "questions[1].question", "questions[1].question: "),
        ({"questions": ["a"], "max_tokens": 800}, "max_tokens", "questions[0]: "),
        # each fits the context; the four need more KV cache than there is
        ({"questions": ["a", "b", "c", "d"], "max_tokens": 300}, "max_tokens",
         "this request may need"),
        ({"context": "z" * 14000, "questions": ["a"]}, "context", "context: the prompt has"),
    ],
)
def test_a_refused_request_names_the_field_it_sent(body, param, starts):
    with pytest.raises(EngineInputError) as refused:
        grouped(**body)
    assert refused.value.param == param
    assert str(refused.value).startswith(starts)


def test_a_chat_request_without_max_tokens_gets_what_fits():
    small = ServedModel("tiny-random", EngineLimits(200, 1000, len(TOKENIZER)), MODEL.prompts)
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "Hello?"}])
    member = asyncio.run(chat_member(request, ("tenant", None), small))
    assert len(member.prompt_ids) + member.params.max_tokens == 200
    too_much = ChatCompletionRequest(messages=[{"role": "user", "content": "Hello?"}],
                                     max_tokens=200)
    with pytest.raises(EngineInputError, match="maximum context length") as refused:
        asyncio.run(chat_member(too_much, ("tenant", None), small))
    assert refused.value.param == "max_tokens"
