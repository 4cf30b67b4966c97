"""What the SQuAD bench reports: per-question records, per-group-size summaries, the tables
(rows as in RESEARCH.md, one column per group size G), the JSON file and the plot."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.squad import Question, score_answer
from bench.squad_http import Reply


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens."""

    prompt: float = 0.10
    completion: float = 0.20

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


def question_record(question: Question, reply: Reply, group_index: int) -> dict:
    """Everything about one answered question; EM/F1/lenient as `bench.squad.score_answer`."""
    scores = score_answer(reply.text, question.answers)
    return {
        "id": question.id,
        "group_index": group_index,
        "context_index": question.context_index,
        "question": question.question,
        "gold_answers": list(question.answers),
        "text": reply.text,
        "answer": scores["answer"],
        "has_tags": scores["has_tags"],
        "em": scores["em"],
        "f1": scores["f1"],
        "lenient": scores["lenient"],
        "finish_reason": reply.finish_reason,
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "cached_tokens": reply.cached_tokens,
            "computed_prompt_tokens": reply.computed_prompt_tokens,
            "completion_tokens": reply.completion_tokens,
        },
        "latency_s": reply.latency_s,
        "ttft_s": reply.ttft_s,
    }


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _spread(values: list[float], name: str) -> dict:
    if not values:
        return {f"{name}_mean_s": None, f"{name}_p50_s": None, f"{name}_p99_s": None}
    return {
        f"{name}_mean_s": statistics.fmean(values),
        f"{name}_p50_s": percentile(values, 0.50),
        f"{name}_p99_s": percentile(values, 0.99),
    }


def summarize(
    group_size: int, questions: list[dict], groups: list[dict], wall_s: float, prices: Prices
) -> dict:
    """The numbers of one column of the tables, from the per-question and per-group records."""
    count = len(questions)
    billed = sum(q["usage"]["prompt_tokens"] for q in questions)
    computed = sum(q["usage"]["computed_prompt_tokens"] for q in questions)
    generated = sum(q["usage"]["completion_tokens"] for q in questions)
    ttfts = [q["ttft_s"] for q in questions if q["ttft_s"] is not None]
    return {
        "group_size": group_size,
        "num_questions": count,
        "num_groups": len(groups),
        "num_requests": sum(g["num_requests"] for g in groups),
        "em": statistics.fmean(q["em"] for q in questions),
        "f1": statistics.fmean(q["f1"] for q in questions),
        "lenient": statistics.fmean(q["lenient"] for q in questions),
        "tag_rate": statistics.fmean(float(q["has_tags"]) for q in questions),
        "finish_reasons": dict(Counter(q["finish_reason"] for q in questions)),
        "prompt_tokens_billed": billed,
        "prompt_tokens_computed": computed,
        "computed_share": computed / billed if billed else None,
        "completion_tokens": generated,
        **_spread([g["latency_s"] for g in groups], "latency"),
        **_spread(ttfts, "ttft"),
        "wall_s": wall_s,
        "questions_per_s": count / wall_s,
        "billed_per_question": billed / count,
        "computed_per_question": computed / count,
        "generated_per_question": generated / count,
        "cost_billed_usd": prices.cost(billed, generated),
        "cost_computed_usd": prices.cost(computed, generated),
    }


def _integer(value) -> str:
    return f"{value:,}"


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _two_places(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _tokens(value) -> str:
    return f"{value:.1f}"


def _dollars(value) -> str:
    return f"${value:.6f}"


QUALITY_ROWS = [
    ("Questions", "num_questions", _integer),
    ("Groups", "num_groups", _integer),
    ("HTTP requests", "num_requests", _integer),
    ("EM", "em", _fraction),
    ("F1", "f1", _fraction),
    ("Lenient acc.", "lenient", _fraction),
    ("Answer-tag rate", "tag_rate", _fraction),
    ("Prompt tokens, API-billed", "prompt_tokens_billed", _integer),
    ("Prompt tokens, computed", "prompt_tokens_computed", _integer),
    ("Computed / billed", "computed_share", _fraction),
    ("Generated tokens", "completion_tokens", _integer),
    ("Prompt tokens per question, billed", "billed_per_question", _tokens),
    ("Prompt tokens per question, computed", "computed_per_question", _tokens),
    ("Generated tokens per question", "generated_per_question", _tokens),
]
TIME_ROWS = [
    ("Latency per group, mean (s)", "latency_mean_s", _two_places),
    ("Latency per group, p50 (s)", "latency_p50_s", _two_places),
    ("Latency per group, p99 (s)", "latency_p99_s", _two_places),
    ("Time to first token, mean (s)", "ttft_mean_s", _two_places),
    ("Time to first token, p50 (s)", "ttft_p50_s", _two_places),
    ("Time to first token, p99 (s)", "ttft_p99_s", _two_places),
    ("Wall time (s)", "wall_s", _two_places),
    ("Questions/s", "questions_per_s", _two_places),
]


def _table(rows: list, summaries: list[dict]) -> list[str]:
    header = "| G (group size) | " + " | ".join(str(s["group_size"]) for s in summaries) + " |"
    lines = [header, "|---" * (len(summaries) + 1) + "|"]
    for label, key, show in rows:
        lines.append(f"| {label} | " + " | ".join(show(s[key]) for s in summaries) + " |")
    return lines


def format_tables(summaries: list[dict], prices: Prices) -> str:
    """Two markdown tables: quality and tokens; time and cost. TTFT rows only when measured."""
    time_rows = [row for row in TIME_ROWS if any(s[row[1]] is not None for s in summaries)]
    price = f"${prices.prompt:g} in / ${prices.completion:g} out per M tokens"
    cost_rows = [
        (f"Cost, billed tokens ({price})", "cost_billed_usd", _dollars),
        ("Cost, computed tokens", "cost_computed_usd", _dollars),
    ]
    lines = _table(QUALITY_ROWS, summaries) + [""] + _table(time_rows + cost_rows, summaries)
    return "\n".join(lines)


def write_json(path: str | Path, config: dict, runs: list[dict]) -> None:
    """runs: [{"summary", "groups", "questions"}] per group size."""
    payload = {"config": config, "runs": runs}
    Path(path).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
