"""POST /v1/grouped_completions on a real server around the tiny model: answers, usage, the
grouped-equals-alone invariant (temperature 0, CSA off), streaming, and splitting."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from model.engine.limits import shared_prefix_length
from server.prompts import ANSWER_SYSTEM_PROMPT, encode_chat, extract_answer, question_messages

CONTEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. "
           "The basin spans nine nations and about seven million square kilometres.")
QUESTIONS = ["Which continent is it on?", "How many nations?", "How large is the basin?"]


def grouped(server, timeout=60, **body) -> httpx.Response:
    payload = {"context": CONTEXT, "questions": QUESTIONS, "max_tokens": 12, **body}
    return httpx.post(f"{server.v1}/grouped_completions", json=payload, timeout=timeout)


def prompts(tokenizer, questions, system_prompt=None) -> list[list[int]]:
    return [encode_chat(tokenizer, question_messages(CONTEXT, q, system_prompt))
            for q in questions]


@pytest.fixture
def server(start_server):
    return start_server()


def test_answers_and_usage(server, tiny_model):
    body = grouped(server, questions=[QUESTIONS[0], {"id": "q-b", "question": QUESTIONS[1]}],
                   temperature=0).json()
    assert body["object"] == "grouped_completion" and body["model"] == "tiny-random"
    answers = body["answers"]
    assert [(a["index"], a["id"]) for a in answers] == [(0, "0"), (1, "q-b")]
    assert all(a["answer"] == extract_answer(a["text"]) for a in answers)
    # billed: each prompt in full, with the answer-in-tags system prompt
    lengths = [len(p) for p in prompts(tiny_model.tokenizer, QUESTIONS[:2])]
    assert [a["usage"]["prompt_tokens"] for a in answers] == lengths
    # the second question reuses the shared prefix (system prompt + passage) of the first
    prefix = shared_prefix_length(prompts(tiny_model.tokenizer, QUESTIONS[:2]))
    assert prefix > len(CONTEXT) // 2  # byte tokenizer: the passage alone is that long
    assert [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers] == [0, prefix]
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(lengths)
    assert usage["prompt_tokens_details"]["cached_tokens"] == prefix
    assert usage["computed_prompt_tokens"] == sum(lengths) - prefix
    assert usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in answers)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_grouped_answers_equal_questions_sent_one_by_one(server):
    together = grouped(server, temperature=0).json()["answers"]
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)

    def alone(question):
        reply = client.chat.completions.create(
            model="tiny-random", messages=question_messages(CONTEXT, question),
            max_tokens=12, temperature=0)
        return reply.choices[0].message.content, reply.choices[0].finish_reason

    for answer, question in zip(together, QUESTIONS):
        assert (answer["text"], answer["finish_reason"]) == alone(question)


def test_system_prompt_replaces_the_default(server, tiny_model):
    custom = "Answer in one word."
    body = grouped(server, questions=QUESTIONS[:1], system_prompt=custom, max_tokens=2).json()
    expected = prompts(tiny_model.tokenizer, QUESTIONS[:1], custom)[0]
    assert body["answers"][0]["usage"]["prompt_tokens"] == len(expected)
    default = prompts(tiny_model.tokenizer, QUESTIONS[:1], ANSWER_SYSTEM_PROMPT)[0]
    assert len(expected) != len(default)


def test_streaming_carries_the_question_index(server):
    expected = grouped(server, temperature=0).json()
    payload = {"context": CONTEXT, "questions": QUESTIONS, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{server.v1}/grouped_completions", json=payload,
                      timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    texts, finished = [""] * len(QUESTIONS), {}
    for chunk in chunks[:-1]:
        (entry,) = chunk["answers"]
        texts[entry["index"]] += entry["delta"]
        if entry["finish_reason"] is not None:
            finished[entry["index"]] = entry
    assert texts == [a["text"] for a in expected["answers"]]
    for answer in expected["answers"]:
        final = finished[answer["index"]]
        assert (final["text"], final["answer"]) == (answer["text"], answer["answer"])
        # asked again: everything but each prompt's last token comes from the prefix cache
        usage = final["usage"]
        assert usage["prompt_tokens"] == answer["usage"]["prompt_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    assert chunks[-1]["answers"] == []
    assert chunks[-1]["usage"]["computed_prompt_tokens"] == len(QUESTIONS)
    assert chunks[-1]["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]


def test_questions_beyond_max_group_size_form_several_groups(start_server, tiny_model):
    server = start_server(max_group_size=2)
    questions = [*QUESTIONS, "Is it wet?", "Is it hot?"]
    usage = grouped(server, questions=questions, max_tokens=2).json()["usage"]
    all_prompts = prompts(tiny_model.tokenizer, questions)
    # groups of 2, 2 and 1: the passage is computed once, not once per group
    document = shared_prefix_length(all_prompts)
    once = document + sum(len(p) - document for p in all_prompts)
    assert usage["prompt_tokens"] == sum(len(p) for p in all_prompts)
    assert 0 < usage["computed_prompt_tokens"] <= once
    sizes = server.app.state.services.metrics.group_size
    assert _histogram(sizes, "_count") == 3 and _histogram(sizes, "_sum") == 5


def test_concurrent_grouped_requests_get_their_own_answers(server):
    other = {"context": "Paris is the capital of France.", "questions": ["Capital?"] * 2}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(grouped, server, temperature=0)
        second = pool.submit(grouped, server, temperature=0, **other)
        first, second = first.result().json(), second.result().json()
    assert len(first["answers"]) == 3 and len(second["answers"]) == 2
    again = grouped(server, temperature=0).json()["answers"]
    assert [a["text"] for a in first["answers"]] == [a["text"] for a in again]


def _histogram(histogram, suffix: str) -> float:
    (family,) = histogram.collect()
    return next(s.value for s in family.samples if s.name.endswith(suffix))


def test_an_empty_system_prompt_means_none(server, tiny_model):
    body = grouped(server, questions=QUESTIONS[:1], system_prompt="", max_tokens=2).json()
    user = {"role": "user", "content": f"Passage:\n{CONTEXT}\n\nQuestion: {QUESTIONS[0]}"}
    expected = len(encode_chat(tiny_model.tokenizer, [user]))
    assert body["answers"][0]["usage"]["prompt_tokens"] == expected
    default = grouped(server, questions=QUESTIONS[:1], max_tokens=2).json()
    assert default["answers"][0]["usage"]["prompt_tokens"] > expected
