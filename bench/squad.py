"""SQuAD v1.1 for the grouping experiment: the question selection, grouping and the scores.

Standard library only (with `server.prompts`, which is too), so `bench/run_squad.py` runs
against any server without torch. The selection follows the research protocol: dev-set contexts
with at least five questions, shuffled with `random.Random(seed)`, the first `num_contexts`, the
first five questions of each in file order. The selection ships inside the package
(`bench/data/squad/`), so an installed `bench` finds it too.

    python -m bench.squad --squad ../shared/data/squad/dev-v1.1.json   # rewrite the shipped file
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from server.prompts import extract_answer

DATA_DIR = Path(__file__).resolve().parent / "data" / "squad"
SELECTION_FILE = DATA_DIR / "dev-selection.json"
QUESTIONS_PER_CONTEXT = 5
FAITHFUL_MULTIPLE = 60  # lcm(1..5): the original trims its flat list to a multiple of this


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    context: str
    context_index: int  # position of its context in the selection


@dataclass(frozen=True)
class Group:
    questions: tuple[Question, ...]

    @property
    def is_context_pure(self) -> bool:
        return len({q.context_index for q in self.questions}) == 1


def select_contexts(squad: dict, num_contexts: int = 100, seed: int = 42) -> list[dict]:
    """-> [{"context", "questions": [{"id", "question", "answers"}] * 5}], in selection order."""
    eligible = [
        paragraph
        for article in squad["data"]
        for paragraph in article["paragraphs"]
        if len(paragraph["qas"]) >= QUESTIONS_PER_CONTEXT
    ]
    random.Random(seed).shuffle(eligible)
    return [
        {
            "context": paragraph["context"],
            "questions": [
                {"id": qa["id"], "question": qa["question"],
                 "answers": [a["text"] for a in qa["answers"]]}
                for qa in paragraph["qas"][:QUESTIONS_PER_CONTEXT]
            ],
        }
        for paragraph in eligible[:num_contexts]
    ]


def load_selection(num_contexts: int, squad_path: str | None = None, seed: int = 42) -> list[dict]:
    """The selection from a full dev file, or from the shipped one (seed 42, 100 contexts)."""
    if squad_path:
        return select_contexts(json.loads(Path(squad_path).read_text()), num_contexts, seed)
    shipped = json.loads(SELECTION_FILE.read_text())
    if seed != shipped["seed"] or num_contexts > len(shipped["contexts"]):
        raise SystemExit(
            f"the shipped selection has seed {shipped['seed']} and {len(shipped['contexts'])} "
            "contexts; pass --squad PATH to a full SQuAD v1.1 dev file for other settings"
        )
    return shipped["contexts"][:num_contexts]


def make_groups(selection: list[dict], group_size: int, faithful: bool = False) -> list[Group]:
    """Context-pure groups (5 questions at G=2: 2, 2, 1). `faithful` reproduces the original:
    one flat list trimmed to a multiple of 60, cut into consecutive chunks that may mix contexts
    (every question keeps its own context)."""
    questions = [
        Question(q["id"], q["question"], tuple(q["answers"]), item["context"], index)
        for index, item in enumerate(selection)
        for q in item["questions"]
    ]
    if faithful:
        questions = questions[: len(questions) // FAITHFUL_MULTIPLE * FAITHFUL_MULTIPLE]
        chunks = [questions[i : i + group_size] for i in range(0, len(questions), group_size)]
    else:
        chunks = [
            chunk
            for index in range(len(selection))
            for chunk in _chunks([q for q in questions if q.context_index == index], group_size)
        ]
    return [Group(tuple(chunk)) for chunk in chunks]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# --- scores: the official SQuAD v1.1 evaluation, plus the lenient match of the research ---


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def lenient_match(prediction: str, gold: str) -> float:
    """Gold within prediction or prediction within gold; an empty prediction scores 0."""
    predicted, expected = normalize_answer(prediction), normalize_answer(gold)
    if not predicted or not expected:
        return 0.0
    return float(expected in predicted or predicted in expected)


def score_answer(raw_text: str, golds: tuple[str, ...] | list[str]) -> dict:
    """Scores one raw model output. EM needs the <answer> tags (as in the original); F1 and the
    lenient match fall back to the raw text when the tags are missing."""
    answer = extract_answer(raw_text)
    prediction = answer if answer is not None else raw_text.strip()
    return {
        "answer": answer,
        "has_tags": answer is not None,
        "em": max(exact_match(prediction, g) for g in golds) if answer is not None else 0.0,
        "f1": max(f1_score(prediction, g) for g in golds),
        "lenient": max(lenient_match(prediction, g) for g in golds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--squad", required=True, help="the official SQuAD v1.1 dev JSON")
    parser.add_argument("--contexts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    contexts = select_contexts(json.loads(Path(args.squad).read_text()), args.contexts, args.seed)
    payload = {
        "source": "SQuAD v1.1 dev (Rajpurkar et al., 2016), CC BY-SA 4.0",
        "seed": args.seed,
        "contexts": contexts,
    }
    SELECTION_FILE.parent.mkdir(parents=True, exist_ok=True)
    SELECTION_FILE.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(contexts)} contexts to {SELECTION_FILE}")


if __name__ == "__main__":
    main()
