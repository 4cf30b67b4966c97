"""End to end on the embedded SmolLM2-135M-Instruct: load, group, answer."""

from __future__ import annotations

import pytest
import torch

from bench.squad import load_selection
from model.engine.grouped_engine import GroupedEngine, Member
from model.engine.sampling import SamplingParams
from model.weights.loading import EMBEDDED_MODEL_NAME, load_model
from server.prompts import encode_chat, question_messages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["auto", "loaded"])
def embedded(request):
    """The default format (int4 from the GGUF on a CPU) and the weights as loaded: grouping is
    exactly invariant in both."""
    return load_model(device="cpu", weights=request.param)


def answers(engine: GroupedEngine, groups: list[list[Member]]) -> dict:
    texts, usages = {}, {}
    for event in engine.generate(groups):
        texts[event.member.tag] = texts.get(event.member.tag, "") + event.text
        if event.usage:
            usages[event.member.tag] = event.usage
    return {"texts": texts, "usages": usages}


def test_a_group_answers_exactly_as_its_questions_alone(embedded):
    assert embedded.name == EMBEDDED_MODEL_NAME
    engine = GroupedEngine(embedded.model, embedded.tokenizer)
    context = load_selection(1)[0]
    params = SamplingParams(max_tokens=24)
    members = [
        Member(encode_chat(embedded.tokenizer, question_messages(context["context"], question)),
               params, tag=index)
        for index, question in enumerate(q["question"] for q in context["questions"][:3])
    ]
    grouped = answers(engine, [members])
    alone = answers(engine, [[Member(m.prompt_ids, params, tag=m.tag)] for m in members])
    assert grouped["texts"] == alone["texts"]
    assert all(text.strip() for text in grouped["texts"].values())
    billed = sum(u.prompt_tokens for u in grouped["usages"].values())
    computed = sum(u.computed_prompt_tokens for u in grouped["usages"].values())
    assert computed < 0.5 * billed
    assert billed == sum(u.prompt_tokens for u in alone["usages"].values())


def test_the_shipped_head_loads_on_bf16_weights():
    """--dtype bfloat16 (the default on a GPU): the server and the engine bench start with the
    shipped group head, whose base model was checked in float32."""
    from bench.engine_bench import build_csa
    from server.config import Settings
    from server.services import Services

    loaded = load_model(device="cpu", dtype="bfloat16")
    head, source = build_csa(None, loaded)
    assert head is not None and source.endswith("smollm2-135m-instruct")
    services = Services(Settings(dtype="bfloat16"))
    services.load()
    assert services.engine.model.dtype is torch.bfloat16
    assert services.engine.csa is not None
