"""Evaluation of the training controls by generation: greedy decoding with the serving prompt
on the grouped engine, scored by the bench's official SQuAD v1.1 EM and F1 (EM needs the
<answer> tags, as in the research protocol; F1 falls back to the raw text without them).

Two sets: held-out passages of the training file, on the model already loaded; and the bench
selection of the dev set, through the bench's own entry point, so training records exactly the
rows `python -m bench.engine_bench` gives for its checkpoints.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from bench import engine_bench
from bench.squad import QUESTIONS_PER_CONTEXT, Group, make_groups, score_answer
from model.engine.grouped_engine import GroupedEngine
from model.engine.interface import Member, SamplingParams
from model.head.group_head import GroupHead
from server.prompts import encode_chat, question_messages
from train.data import Passage

BENCH_GROUP_SIZES = "1,5"


def as_selection(passages: Sequence[Passage]) -> list[dict]:
    """Passages in the layout of the bench's question selection: the first five questions of
    each, with ids "passage-question"."""
    return [
        {
            "context": passage.context,
            "questions": [
                {"id": f"{p}-{q}", "question": question.question,
                 "answers": list(question.answers)}
                for q, question in enumerate(passage.questions[:QUESTIONS_PER_CONTEXT])
            ],
        }
        for p, passage in enumerate(passages)
    ]


def evaluate(
    engine: GroupedEngine, groups: Sequence[Group], group_size: int, max_tokens: int = 96,
    batch_groups: int = 1, on_questions: Callable[[int], None] | None = None,
) -> dict:
    """Generates an answer for every question of `groups`, `batch_groups` groups per engine
    call -> mean EM, F1, tag rate, tokens, seconds."""
    params = SamplingParams(max_tokens=max_tokens)
    scores, completion_tokens, began = [], 0, time.perf_counter()
    for start in range(0, len(groups), batch_groups):
        batch = groups[start : start + batch_groups]
        members = [
            [Member(encode_chat(engine.tokenizer, question_messages(q.context, q.question)),
                    params, tag=q.id) for q in group.questions]
            for group in batch
        ]
        texts: dict[str, str] = collections.defaultdict(str)
        for event in engine.generate(members):
            texts[event.member.tag] += event.text
            if event.usage is not None:
                completion_tokens += event.usage.completion_tokens
        questions = [q for group in batch for q in group.questions]
        scores += [score_answer(texts[q.id], q.answers) for q in questions]
        if on_questions is not None:
            on_questions(len(questions))
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


def heldout_generation(
    loaded, heads: dict[str, GroupHead | None], passages: Sequence[Passage], contexts: int,
    group_sizes: Sequence[int], max_tokens: int,
) -> dict:
    """EM/F1 of every control on the first `contexts` passages with at least five questions."""
    chosen = [p for p in passages if len(p.questions) >= QUESTIONS_PER_CONTEXT][:contexts]
    selection = as_selection(chosen)
    results = {}
    total = len(heads) * len(group_sizes) * QUESTIONS_PER_CONTEXT * len(chosen)
    with tqdm(total=total, desc="held-out eval", unit="q", mininterval=1.0) as bar:
        for name, head in heads.items():
            engine = GroupedEngine(loaded.model, loaded.tokenizer, head)
            results[name] = {
                f"G{size}": evaluate(engine, make_groups(selection, size), size, max_tokens,
                                     batch_groups=max(1, QUESTIONS_PER_CONTEXT // size),
                                     on_questions=bar.update)
                for size in group_sizes
            }
    return results


def bench_controls(
    paths: dict[str, Path], contexts: int, model: str | None = None, threads: int | None = None,
    max_tokens: int | None = None, weights: str | None = None,
) -> dict:
    """Runs the bench (`python -m bench.engine_bench --group-sizes 1,5`, in this process) with CSA
    off and with every checkpoint of `paths`, as stored; returns its rows without the answers."""
    results = {}
    for name, csa in {"base": "off", **{k: str(v) for k, v in paths.items()}}.items():
        argv = ["--contexts", str(contexts), "--group-sizes", BENCH_GROUP_SIZES, "--csa", csa]
        argv += ["--model", model] if model else []
        argv += ["--threads", str(threads)] if threads else []
        argv += ["--max-tokens", str(max_tokens)] if max_tokens else []
        argv += ["--weights", weights] if weights else []
        rows = engine_bench.main(argv)["results"]
        results[name] = {
            f"G{row['group_size']}": {k: v for k, v in row.items() if k != "answers"}
            for row in rows
        }
    return results
