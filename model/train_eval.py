"""Evaluation of the CSA training controls by generation: greedy decoding with the serving
prompt on the grouped engine, scored with the official SQuAD v1.1 EM and F1.

EM needs the <answer> tags (as in the research protocol); F1 falls back to the raw text when the
tags are missing. This mirrors the bench's scoring without importing `bench/`.
"""

from __future__ import annotations

import collections
import re
import string
import time
from collections.abc import Callable, Sequence

from model.engine import GroupedEngine, Member
from model.prompts import encode_chat, extract_answer, question_messages
from model.sampling import SamplingParams
from model.train_data import Passage

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    overlap = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def score_text(raw_text: str, golds: Sequence[str]) -> dict:
    answer = extract_answer(raw_text)
    prediction = answer if answer is not None else raw_text.strip()
    exact = answer is not None and any(
        normalize_answer(answer) == normalize_answer(g) for g in golds
    )
    return {
        "em": float(exact),
        "f1": max(token_f1(prediction, g) for g in golds),
        "has_tags": answer is not None,
    }


def eval_groups(passages: Sequence[Passage], group_size: int, per_passage: int = 5) -> list:
    """Context-pure groups: the first `per_passage` questions of each passage, in chunks of
    `group_size` -> [[(passage, question), ...], ...]."""
    groups = []
    for passage in passages:
        items = [(passage, q) for q in passage.questions[:per_passage]]
        groups += [items[i : i + group_size] for i in range(0, len(items), group_size)]
    return groups


def evaluate(
    engine: GroupedEngine, passages: Sequence[Passage], group_size: int, max_tokens: int = 96,
    batch_groups: int = 1, on_questions: Callable[[int], None] | None = None,
) -> dict:
    """Generates an answer for the first five questions of every passage, `group_size` questions
    per group, `batch_groups` groups per engine call -> mean EM, F1, tag rate, tokens, seconds."""
    params = SamplingParams(max_tokens=max_tokens)
    groups = eval_groups(passages, group_size)
    scores, completion_tokens, began = [], 0, time.perf_counter()
    for start in range(0, len(groups), batch_groups):
        batch = groups[start : start + batch_groups]
        members = [
            [Member(encode_chat(engine.tokenizer, question_messages(p.context, q.question)),
                    params, tag=q) for p, q in group]
            for group in batch
        ]
        texts: dict[int, str] = collections.defaultdict(str)
        for event in engine.generate(members):
            texts[id(event.member)] += event.text
            if event.usage is not None:
                completion_tokens += event.usage.completion_tokens
        for member in (m for group in members for m in group):
            scores.append(score_text(texts[id(member)], member.tag.answers))
        if on_questions is not None:
            on_questions(sum(len(g) for g in batch))
    count = max(len(scores), 1)
    return {
        "group_size": group_size,
        "questions": len(scores),
        "em": sum(s["em"] for s in scores) / count,
        "f1": sum(s["f1"] for s in scores) / count,
        "tag_rate": sum(s["has_tags"] for s in scores) / count,
        "completion_tokens": completion_tokens,
        "seconds": round(time.perf_counter() - began, 1),
    }
