"""Training data: SQuAD-layout passages and one (prompt, target) example per question.

The prompt is the serving prompt; the target is `<answer>{first gold answer}</answer>` + the
end-of-turn token, the answer format serving asks for.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.prompts import encode_chat, question_messages


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]  # gold answers; the first one is the training target


@dataclass(frozen=True)
class Passage:
    context: str
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class Example:
    """One question, tokenized: the serving prompt and the answer it should produce."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # <answer>{first gold}</answer> + end-of-turn
    passage_index: int


def read_squad(path: str | Path) -> list[Passage]:
    """Passages of a file in the official SQuAD v1.1 JSON layout, in file order."""
    try:
        data = json.loads(Path(path).read_text())["data"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"cannot read SQuAD file {path}: {exc}") from exc
    passages = []
    for article in data:
        for paragraph in article["paragraphs"]:
            questions = tuple(
                Question(qa["question"], tuple(a["text"].strip() for a in qa["answers"]))
                for qa in paragraph["qas"]
                if qa["answers"]
            )
            if questions:
                passages.append(Passage(paragraph["context"], questions))
    return passages


def split_passages(num_passages: int, num_heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """-> (train, held-out) passage indices, both sorted; the held-out ones drawn with
    `random.Random(seed)`."""
    if not 0 < num_heldout < num_passages:
        raise SystemExit(f"cannot hold out {num_heldout} of {num_passages} passages")
    order = list(range(num_passages))
    random.Random(seed).shuffle(order)
    return sorted(order[num_heldout:]), sorted(order[:num_heldout])


def answer_target(tokenizer, answer: str) -> list[int]:
    ids = tokenizer(f"<answer>{answer}</answer>", add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def make_examples(tokenizer, passages: Sequence[Passage]) -> list[Example]:
    return [
        Example(
            tuple(encode_chat(tokenizer, question_messages(passage.context, q.question))),
            tuple(answer_target(tokenizer, q.answers[0])),
            index,
        )
        for index, passage in enumerate(passages)
        for q in passage.questions
    ]
